"""Datasets from generated archives in the exact standard formats, digits splits, the in-memory loader."""
from __future__ import annotations

import hashlib
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments import data, datasets

# ------------------------------------------------------------------------------------------------ helpers


class WritesFile:
    """A pickle payload that creates a file when unpickled by a lenient loader."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def write_cifar(root: Path, name: str, n: int = 3, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write a CIFAR python folder (Python-2 style bytes keys, protocol 2) and return what went in."""
    spec = data.CIFAR[name]
    folder = root / spec["folder"]
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for member in spec["train"] + spec["test"]:
        images = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, spec["num_classes"], size=n)
        batch = {b"batch_label": b"batch", b"data": images, b"filenames": [b"f.png"] * n}
        if name == "cifar10":
            batch[b"labels"] = [int(v) for v in labels]
        else:
            batch[b"fine_labels"] = [int(v) for v in labels]
            batch[b"coarse_labels"] = [int(v) // 5 for v in labels]
        (folder / member).write_bytes(pickle.dumps(batch, protocol=2))
        written[member] = (images, labels)
    return written


def make_tar(src_root: Path, folder: str, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src_root / folder, arcname=folder)
    return archive


# ------------------------------------------------------------------------------------------------ CIFAR


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_folder_and_archive_load_the_same_tensors(tmp_path, name):
    written = write_cifar(tmp_path / "src", name)
    spec = data.CIFAR[name]
    x, y = data.load_cifar(name, tmp_path / "src", "train")
    assert x.shape == (3 * len(spec["train"]), 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    images, labels = written[spec["train"][0]]
    # channel-major rows: value (c, h, w) sits at c*1024 + h*32 + w
    assert x[1, 2, 5, 7] == images[1, 2 * 1024 + 5 * 32 + 7] / 255.0
    assert y[: len(labels)].tolist() == labels.tolist()
    xt, yt = data.load_cifar(name, tmp_path / "src" / spec["folder"], "test")
    assert xt.shape == (3, 3, 32, 32) and yt.tolist() == written[spec["test"][0]][1].tolist()

    archive = make_tar(tmp_path / "src", spec["folder"], tmp_path / spec["archive"])
    for root in (archive, tmp_path):  # the archive itself, or a folder holding only the archive
        xa, ya = data.load_cifar(name, root, "train")
        assert torch.equal(xa, x) and torch.equal(ya, y)
    raw, _ = data.load_cifar(name, archive, "train", dtype=torch.uint8)
    assert raw.dtype == torch.uint8 and torch.equal(raw.float() / 255, x)


def test_cifar_named_loaders_and_dispatch(tmp_path):
    write_cifar(tmp_path, "cifar10")
    write_cifar(tmp_path, "cifar100")
    assert data.load_cifar10(tmp_path, split="test")[0].shape == (3, 3, 32, 32)
    assert data.load_cifar100(tmp_path, split="test")[1].max() < 100
    assert torch.equal(datasets.load_dataset("cifar10", tmp_path, "test")[0], data.load_cifar10(tmp_path, "test")[0])
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*cifar10"):
        datasets.load_dataset("mnist")
    with pytest.raises(ValueError, match="needs root"):
        datasets.load_dataset("svhn")
    with pytest.raises(ValueError, match="split 'val'"):
        data.load_cifar10(tmp_path, "val")


def test_cifar_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz.*download_cifar"):
        data.load_cifar10(tmp_path / "nowhere")
    write_cifar(tmp_path / "src", "cifar10")
    archive = make_tar(tmp_path / "src", "cifar-10-batches-py", tmp_path / "full.tar.gz")
    truncated = tmp_path / "trunc" / "cifar-10-python.tar.gz"
    truncated.parent.mkdir()
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupted"):
        data.load_cifar10(truncated.parent)
    not_tar = tmp_path / "junk.tar.gz"
    not_tar.write_bytes(b"hello, I am not an archive")
    with pytest.raises(ValueError, match="corrupted or not a tar archive"):
        data.load_cifar10(not_tar)
    folder = tmp_path / "src" / "cifar-10-batches-py"
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"data_batch_2: expected uint8 data \(N, 3072\)"):
        data.load_cifar10(folder)
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}))
    with pytest.raises(ValueError, match="labels outside 0..9"):
        data.load_cifar10(folder)
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)})[:-9])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        data.load_cifar10(folder)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    write_cifar(tmp_path, "cifar10")
    target = tmp_path / "pwned.txt"
    payload = {b"data": WritesFile(target), b"labels": [0]}
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(ValueError, match="refusing to load .*open: dataset pickles may only contain numpy arrays"):
        data.load_cifar10(tmp_path, "test")
    assert not target.exists()
    pseudo = tmp_path / "ti.pickle"
    pseudo.write_bytes(pickle.dumps(WritesFile(target)))
    with pytest.raises(ValueError, match="refusing"):
        data.load_pseudo_labeled(pseudo)
    assert not target.exists()


def test_download_cifar_checks_md5_and_extracts(tmp_path):
    write_cifar(tmp_path / "src", "cifar10")
    archive = make_tar(tmp_path / "src", "cifar-10-batches-py", tmp_path / "served.tar.gz")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    url = archive.as_uri()
    with pytest.raises(ValueError, match="MD5 .* does not match"):
        data.download_cifar(tmp_path / "bad", "cifar10", url=url, md5="0" * 32, progress=False)
    assert not any((tmp_path / "bad").iterdir())  # nothing half-downloaded is left behind
    folder = data.download_cifar(tmp_path / "dest", "cifar10", url=url, md5=md5, progress=False)
    assert folder == tmp_path / "dest" / "cifar-10-batches-py" and (folder / "data_batch_5").is_file()
    assert torch.equal(data.load_cifar10(tmp_path / "dest")[0], data.load_cifar10(tmp_path / "src")[0])
    with pytest.raises(OSError, match="could not download"):
        data.download_cifar(tmp_path / "x", "cifar10", url=(tmp_path / "missing.tar.gz").as_uri(), progress=False)
    data.verify_md5(archive, md5.upper())


def test_extract_archive_refuses_escaping_members(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    payload = tmp_path / "payload.txt"
    payload.write_text("x")
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(payload, arcname="../escaped.txt")
    with pytest.raises(ValueError, match="unsafe member"):
        data.extract_archive(evil, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


# ------------------------------------------------------------------------------------------------ SVHN, 500K


def test_svhn_mat(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, size=(32, 32, 3, 5), dtype=np.uint8)
    y = np.array([[10], [1], [2], [10], [9]], dtype=np.uint8)
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": X, "y": y})
    x, labels = data.load_svhn(tmp_path, "test")
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
    assert labels.tolist() == [0, 1, 2, 0, 9] and labels.dtype == torch.int64
    assert x[3, 1, 4, 6] == X[4, 6, 1, 3] / 255.0
    assert torch.equal(datasets.load_dataset("svhn", tmp_path, "test")[1], labels)
    with pytest.raises(FileNotFoundError, match="train_32x32.mat.*ufldl"):
        data.load_svhn(tmp_path, "train")
    scipy.io.savemat(tmp_path / "extra_32x32.mat", {"images": X})
    with pytest.raises(ValueError, match="expected variables 'X' and 'y'"):
        data.load_svhn(tmp_path, "extra")
    (tmp_path / "train_32x32.mat").write_bytes(b"garbage" * 20)
    with pytest.raises(ValueError, match="not a readable MATLAB"):
        data.load_svhn(tmp_path, "train")


def test_pseudo_labeled_pickle(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    targets = rng.integers(0, 10, size=6)
    path = tmp_path / "ti_500K_pseudo_labeled.pickle"
    path.write_bytes(pickle.dumps({"data": images, "extrapolated_targets": targets}))
    x, y = data.load_pseudo_labeled(path)
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.uint8 and y.tolist() == targets.tolist()
    assert x[2, 0, 3, 4] == images[2, 3, 4, 0]
    xf, _ = data.load_pseudo_labeled(path, dtype=torch.float32)
    assert xf.dtype == torch.float32 and float(xf.max()) <= 1.0
    path.write_bytes(pickle.dumps({"data": images, "targets": targets}))
    with pytest.raises(ValueError, match="'extrapolated_targets'"):
        data.load_pseudo_labeled(path)
    with pytest.raises(FileNotFoundError, match="semisup-adv"):
        data.load_pseudo_labeled(tmp_path / "absent.pickle")


# ------------------------------------------------------------------------------------------------ digits


def test_digits_splits():
    from sklearn.datasets import load_digits as sk_digits

    sk = sk_digits()
    parts = {s: data.load_digits(s) for s in ("train", "val", "test")}
    assert sum(p[0].shape[0] for p in parts.values()) == 1797
    for x, y in parts.values():
        assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert torch.bincount(y, minlength=10).min() > 0  # stratified: every class in every split
    # the union is exactly the dataset (values 0..16 scaled by 1/16)
    union = sorted(tuple(r) for r in (torch.cat([p[0] for p in parts.values()]).reshape(1797, 64) * 16).tolist())
    assert union == sorted(tuple(r) for r in sk.data.astype(np.float32).tolist())
    assert [len(parts[s][1]) for s in ("train", "val", "test")] == [1259, 179, 359]
    # the test split never depends on the seed; train/val do
    assert torch.equal(data.load_digits("test", seed=5)[0], parts["test"][0])
    assert not torch.equal(data.load_digits("val", seed=5)[0], parts["val"][0])
    assert torch.equal(data.load_digits("train", seed=0)[0], parts["train"][0])
    trainval = data.load_digits("trainval")[0]
    assert trainval.shape[0] == parts["train"][0].shape[0] + parts["val"][0].shape[0]
    with pytest.raises(ValueError, match="unknown digits split 'dev'"):
        data.load_digits("dev")


def test_digits_splits_are_disjoint():
    flat = {s: {tuple(r.tolist()) + (int(c),) for r, c in zip(x.reshape(len(x), -1), y)}
            for s, (x, y) in ((s, data.load_digits(s)) for s in ("train", "val", "test"))}
    # digits has a handful of duplicate images; disjoint index sets leave at most those in common
    assert len(flat["train"] & flat["test"]) <= 5 and len(flat["val"] & flat["test"]) <= 5


@settings(max_examples=20, deadline=None)
@given(n=st.integers(20, 200), val=st.integers(1, 19), seed=st.integers(0, 10))
def test_carve_validation(n, val, seed):
    y = torch.arange(n) % 4
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    (xt, yt), (xv, yv) = data.carve_validation(x, y, val, seed=seed)
    assert abs(len(yv) - val) <= 4 and len(yt) + len(yv) == n
    assert set(xt.flatten().tolist()).isdisjoint(xv.flatten().tolist())
    (_, _), (xv2, _) = data.carve_validation(x, y, val, seed=seed)
    assert torch.equal(xv, xv2)


# ------------------------------------------------------------------------------------------------ loader


def batches(loader):
    return [(xb.clone(), yb.clone()) for xb, yb in loader]


def test_loader_covers_each_sample_once_and_is_seeded():
    x = torch.rand(10, 1, 4, 4)
    y = torch.arange(10)
    loader = data.InMemoryLoader(x, y, batch_size=3, shuffle=True, seed=1)
    assert len(loader) == 4
    epoch0 = batches(loader)
    seen = torch.cat([b[1] for b in epoch0])
    assert sorted(seen.tolist()) == list(range(10)) and [len(b[1]) for b in epoch0] == [3, 3, 3, 1]
    for xb, yb in epoch0:
        assert torch.equal(xb, x[yb])
    epoch1 = batches(loader)
    assert not torch.equal(torch.cat([b[1] for b in epoch1]), seen)
    again = data.InMemoryLoader(x, y, batch_size=3, shuffle=True, seed=1)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches(again), epoch0))
    plain = data.InMemoryLoader(x, y, batch_size=4, shuffle=False, drop_last=True)
    assert [b[1].tolist() for b in plain] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_loader_resumes_mid_epoch_bit_exactly():
    x, y = torch.rand(23, 3, 6, 6), torch.arange(23)
    reference = data.InMemoryLoader(x, y, batch_size=4, augment=True, seed=7, crop_padding=2)
    run = batches(reference) + batches(reference)  # two epochs, uninterrupted
    interrupted = data.InMemoryLoader(x, y, batch_size=4, augment=True, seed=7, crop_padding=2)
    first = batches(interrupted)
    it = iter(interrupted)
    first += [tuple(t.clone() for t in next(it)) for _ in range(2)]
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batch": 2, "seed": 7, "num_samples": 23}
    resumed = data.InMemoryLoader(x, y, batch_size=4, augment=True, seed=0, crop_padding=2)
    resumed.load_state_dict(state)
    rest = batches(resumed)
    assert len(first) + len(rest) == len(run)
    for (xa, ya), (xb, yb) in zip(run, first + rest):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(ValueError, match="state is for 23 samples"):
        data.InMemoryLoader(x[:5], y[:5]).load_state_dict(state)


def test_loader_rolls_over_after_a_fully_consumed_epoch():
    loader = data.InMemoryLoader(torch.rand(4, 1, 2, 2), torch.arange(4), batch_size=2)
    it = iter(loader)
    next(it), next(it)
    assert loader.state_dict()["batch"] == 2
    assert len(batches(loader)) == 2 and loader.state_dict()["epoch"] == 2


def test_augmentation_is_a_padded_crop_and_flip():
    x = torch.rand(16, 2, 5, 5)
    gen = torch.Generator().manual_seed(0)
    out = data.random_crop_flip(x, gen, padding=2, flip=True)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flipped = 0
    for i in range(16):
        windows = [padded[i, :, r:r + 5, c:c + 5] for r in range(5) for c in range(5)]
        straight = any(torch.equal(out[i], w) for w in windows)
        mirrored = any(torch.equal(out[i], w.flip(-1)) for w in windows)
        assert straight or mirrored
        flipped += int(mirrored and not straight)
    assert 0 < flipped < 16
    assert torch.equal(data.random_crop_flip(x, gen, padding=0, flip=False), x)


def test_loader_converts_uint8_and_validates():
    x = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    xb, _ = next(iter(data.InMemoryLoader(x, torch.arange(5), batch_size=5, shuffle=False)))
    assert xb.dtype == torch.float32 and torch.equal(xb, x.float() / 255)
    with pytest.raises(ValueError, match="expected non-empty x"):
        data.InMemoryLoader(torch.rand(5, 4, 4), torch.arange(5))
    with pytest.raises(TypeError, match="int64"):
        data.InMemoryLoader(torch.zeros(5, 1, 2, 2, dtype=torch.int64), torch.arange(5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loader_augments_on_the_gpu_and_resumes():
    x, y = torch.rand(20, 3, 8, 8, device="cuda"), torch.arange(20, device="cuda")
    full = batches(data.InMemoryLoader(x, y, batch_size=6, augment=True, seed=3))
    assert all(xb.device.type == "cuda" for xb, _ in full)
    part = data.InMemoryLoader(x, y, batch_size=6, augment=True, seed=3)
    it = iter(part)
    head = [tuple(t.clone() for t in next(it))]
    resumed = data.InMemoryLoader(x, y, batch_size=6, augment=True, seed=3)
    resumed.load_state_dict(part.state_dict())
    for (xa, ya), (xb, yb) in zip(full, head + batches(resumed)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_registry_splits_agree_with_the_readers():
    """experiments.datasets names the splits the file readers of experiments.data accept."""
    assert datasets.DATASETS["digits"]["splits"] == data.DIGITS_SPLITS
    assert datasets.DATASETS["svhn"]["splits"] == data.SVHN_SPLITS
    assert set(datasets.TRAINABLE) <= set(datasets.DATASETS)
