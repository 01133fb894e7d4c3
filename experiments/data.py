"""Datasets from their standard files, returned as in-memory tensors, and a fast in-memory loader.

Every loader returns ``(x, y)``: ``x`` float32 in [0, 1] shaped (N, C, H, W) (or the raw uint8 bytes with
``dtype=torch.uint8``, 4x less memory; :class:`InMemoryLoader` converts batches) and ``y`` int64 (N,).

- scikit-learn digits (bundled, 1797 images of 1x8x8): fixed stratified train/val/test split;
- CIFAR-10/100 python-pickle archives (the extracted folder or the .tar.gz), :func:`download_cifar`;
- SVHN ``{train,test,extra}_32x32.mat``; the 500K pseudo-labelled pickle (keys ``data``, ``extrapolated_targets``).

Pickled archives are read with an unpickler that only rebuilds numpy arrays: nothing in a file can run code.

References: Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009 (CIFAR); Netzer et al.,
"Reading Digits in Natural Images with Unsupervised Feature Learning", 2011 (SVHN); Carmon et al., "Unlabeled
Data Improves Adversarial Robustness", NeurIPS 2019 (500K pseudo-labelled TinyImages).
"""
from __future__ import annotations

import hashlib
import importlib
import io
import pickle
import tarfile
import urllib.request
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

Split = tuple[torch.Tensor, torch.Tensor]

# ------------------------------------------------------------------------------------------------ tensors


def _to_tensors(images_nhwc: np.ndarray, labels: np.ndarray, dtype: torch.dtype, scale: float = 255.0) -> Split:
    """(N, H, W, C) array -> (N, C, H, W) tensor (float32 in [0, 1] or raw uint8) and int64 labels."""
    if dtype not in (torch.float32, torch.uint8):
        raise ValueError(f"dtype must be torch.float32 or torch.uint8, got {dtype}")
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2).contiguous()
    x = x if dtype == torch.uint8 else x.to(torch.float32).div_(scale)
    return x, torch.from_numpy(np.asarray(labels).astype(np.int64).reshape(-1))


def _stratified_holdout(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out): ``round(fraction * n_c)`` of every class held out, chosen under ``seed``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"hold-out fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        held.append(rng.permutation(idx)[: int(round(fraction * idx.size))])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    mask = np.ones(y.shape[0], dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


def carve_validation(x: torch.Tensor, y: torch.Tensor, val_size: int | float, seed: int = 0) -> tuple[Split, Split]:
    """Split ``(x, y)`` into ``(train, val)``, stratified by class under a fixed ``seed``.

    ``val_size`` is a count (int) or a fraction of ``len(x)`` (float in [0, 1)). The test split is never touched.
    """
    n = int(y.shape[0])
    if isinstance(val_size, float):
        fraction = val_size
    elif isinstance(val_size, int) and 0 <= val_size < n:
        fraction = val_size / n if n else 0.0
    else:
        raise ValueError(f"val_size must be an int in [0, {n}) or a float in [0, 1), got {val_size!r}")
    keep, held = _stratified_holdout(y.cpu().numpy(), fraction, seed)
    keep_t, held_t = torch.from_numpy(keep).to(x.device), torch.from_numpy(held).to(x.device)
    return (x[keep_t], y[keep_t]), (x[held_t], y[held_t])


# ------------------------------------------------------------------------------------------------ digits

DIGITS_TEST_FRACTION = 0.2
DIGITS_VAL_FRACTION = 0.1
DIGITS_SPLITS = ("train", "val", "test", "trainval")


def load_digits(split: str = "train", seed: int = 0, dtype: torch.dtype = torch.float32) -> Split:
    """scikit-learn's digits as (N, 1, 8, 8) images in [0, 1] (pixel values 0..16 divided by 16).

    Stratified split: ``test`` is a fixed 20% (the same for every ``seed``, so no seed leaks test images into
    training); of the rest, ``val`` is 10% of the whole set chosen under ``seed`` and ``train`` the remainder;
    ``trainval`` is train + val. Sizes: train 1259, val 179, test 359.
    """
    if split not in DIGITS_SPLITS:
        raise ValueError(f"unknown digits split {split!r}; choose one of: {', '.join(DIGITS_SPLITS)}")
    if dtype != torch.float32:
        raise ValueError("digits are only provided as float32 (pixel values 0..16 are not bytes)")
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = bunch.images.astype(np.float32)[..., None]  # (N, 8, 8, 1), values 0..16
    labels = bunch.target.astype(np.int64)
    trainval, test = _stratified_holdout(labels, DIGITS_TEST_FRACTION, seed=0)
    if split == "test":
        chosen = test
    elif split == "trainval":
        chosen = trainval
    else:
        val_fraction = DIGITS_VAL_FRACTION / (1.0 - DIGITS_TEST_FRACTION)
        train_pos, val_pos = _stratified_holdout(labels[trainval], val_fraction, seed)
        chosen = trainval[train_pos if split == "train" else val_pos]
    return _to_tensors(images[chosen], labels[chosen], torch.float32, scale=16.0)


# ------------------------------------------------------------------------------------------------ safe pickles

_NUMPY_GLOBALS = {
    ("multiarray", "_reconstruct"),
    ("multiarray", "scalar"),
    ("numeric", "_frombuffer"),
}


class RefusedPickleError(pickle.UnpicklingError):
    """A pickle names a global that is not a numpy array constructor."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays, dicts, lists and scalars; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module in ("numpy.dtypes",) and name.endswith("DType"):
            return getattr(importlib.import_module(module), name)
        for prefix in ("numpy.core.", "numpy._core."):
            sub = module[len(prefix):] if module.startswith(prefix) else None
            if sub is not None and (sub, name) in _NUMPY_GLOBALS:
                try:  # numpy >= 2 names its core "numpy._core"; numpy 1 only has "numpy.core"
                    return getattr(importlib.import_module(f"numpy._core.{sub}"), name)
                except ImportError:
                    return getattr(importlib.import_module(f"numpy.core.{sub}"), name)
        if (module, name) == ("_codecs", "encode"):
            import _codecs

            return _codecs.encode
        raise RefusedPickleError(
            f"refusing to load {module}.{name}: dataset pickles may only contain numpy arrays, "
            "this file could run code (re-create it from the official source)"
        )


def safe_unpickle(data: bytes, what: str) -> Any:
    """Load a dataset pickle (Python 2 or 3) that may only contain arrays; one-line error otherwise."""
    try:
        return _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except RefusedPickleError as exc:
        raise ValueError(f"{what}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise ValueError(f"{what}: not a valid dataset pickle (truncated or corrupted?): {exc}") from None


def _str_keys(obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"{what}: expected a pickled dict, found {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


# ------------------------------------------------------------------------------------------------ CIFAR

CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": "labels",
        "num_classes": 10,
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "train": ["train"],
        "test": ["test"],
        "label_key": "fine_labels",
        "num_classes": 100,
    },
}


def _cifar_spec(name: str) -> dict[str, Any]:
    if name not in CIFAR:
        raise ValueError(f"unknown CIFAR dataset {name!r}; choose one of: {', '.join(CIFAR)}")
    return CIFAR[name]


def _missing_cifar(name: str, root: Path) -> FileNotFoundError:
    spec = CIFAR[name]
    return FileNotFoundError(
        f"{name} not found under {root}: put the folder {spec['folder']}/ or the archive {spec['archive']} there "
        f"(from {spec['url']}), or call experiments.data.download_cifar({str(root)!r}, {name!r}) / pass --download"
    )


def _read_cifar_members(name: str, root: Path, members: list[str]) -> dict[str, bytes]:
    """Bytes of ``members`` from the extracted folder or straight from the .tar.gz."""
    spec = CIFAR[name]
    if root.is_file():
        archive = root
    else:
        for folder in (root / spec["folder"], root):
            if all((folder / f).is_file() for f in spec["test"]):
                missing = [m for m in members if not (folder / m).is_file()]
                if missing:
                    raise FileNotFoundError(f"{folder}: missing {', '.join(missing)}; re-extract {spec['archive']}")
                return {m: (folder / m).read_bytes() for m in members}
        archive = root / spec["archive"]
        if not archive.is_file():
            raise _missing_cifar(name, root)
    try:
        with tarfile.open(archive, "r:*") as tar:
            found = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [m for m in members if m not in found]
            if missing:
                raise ValueError(f"{archive}: members {', '.join(missing)} missing; is this the {name} python archive?")
            return {m: tar.extractfile(found[m]).read() for m in members}
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise ValueError(f"{archive}: corrupted or not a tar archive ({exc}); delete it and download again") from None


def load_cifar(
    name: str, root: str | Path, split: str = "train", *, download: bool = False, dtype: torch.dtype = torch.float32
) -> Split:
    """CIFAR-10 or CIFAR-100 (fine labels) ``split`` ("train" or "test") from ``root``.

    ``root`` is the archive itself, a folder holding it, the extracted ``cifar-*-python`` folder, or its parent.
    """
    spec = _cifar_spec(name)
    if split not in ("train", "test"):
        raise ValueError(f"unknown {name} split {split!r}; choose 'train' or 'test' (carve validation with carve_validation)")
    root = Path(root).expanduser()
    if download and not root.is_file():
        try:
            _read_cifar_members(name, root, [])
        except FileNotFoundError:
            download_cifar(root, name)
    raw = _read_cifar_members(name, root, spec[split])
    images, labels = [], []
    for member in spec[split]:
        what = f"{name} {member}"
        batch = _str_keys(safe_unpickle(raw[member], what), what)
        if "data" not in batch or spec["label_key"] not in batch:
            raise ValueError(f"{what}: missing keys 'data'/{spec['label_key']!r}; found {sorted(batch)}")
        data = np.asarray(batch["data"])
        lab = np.asarray(batch[spec["label_key"]], dtype=np.int64).reshape(-1)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != lab.shape[0]:
            raise ValueError(
                f"{what}: expected uint8 data (N, 3072) with N labels, got {data.dtype} {data.shape} and {lab.shape[0]} labels"
            )
        if lab.size and (lab.min() < 0 or lab.max() >= spec["num_classes"]):
            raise ValueError(f"{what}: labels outside 0..{spec['num_classes'] - 1}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    return _to_tensors(np.concatenate(images), np.concatenate(labels), dtype)


def load_cifar10(root: str | Path, split: str = "train", *, download: bool = False,
                 dtype: torch.dtype = torch.float32) -> Split:
    """CIFAR-10 (3x32x32, 10 classes); see :func:`load_cifar`."""
    return load_cifar("cifar10", root, split, download=download, dtype=dtype)


def load_cifar100(root: str | Path, split: str = "train", *, download: bool = False,
                  dtype: torch.dtype = torch.float32) -> Split:
    """CIFAR-100 with its 100 fine labels; see :func:`load_cifar`."""
    return load_cifar("cifar100", root, split, download=download, dtype=dtype)


def file_md5(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_md5(path: str | Path, md5: str) -> None:
    """Raise ``ValueError`` if ``path``'s MD5 differs from ``md5``."""
    actual = file_md5(path)
    if actual != md5.lower():
        raise ValueError(f"{path}: MD5 {actual} does not match the expected {md5}; the download is corrupted, delete it and retry")


def extract_archive(archive: str | Path, root: str | Path) -> None:
    """Extract a tar archive under ``root``, refusing links and paths that leave ``root``."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(root, filter="data")
    except tarfile.FilterError as exc:
        raise ValueError(f"{archive}: refusing unsafe member ({exc})") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise ValueError(f"{archive}: corrupted or not a tar archive ({exc}); delete it and download again") from None


def download_cifar(root: str | Path, name: str = "cifar10", *, url: str | None = None, md5: str | None = None,
                   progress: bool = True) -> Path:
    """Download the official ``name`` archive into ``root``, check its MD5 and extract it; returns the folder.

    An archive already in ``root`` with the right MD5 is not downloaded again.
    """
    spec = _cifar_spec(name)
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    archive = root / spec["archive"]
    md5 = md5 or spec["md5"]
    if not (archive.is_file() and file_md5(archive) == md5):
        partial = archive.with_name(archive.name + ".part")
        try:
            with urllib.request.urlopen(url or spec["url"], timeout=60) as response, open(partial, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                from tqdm import tqdm

                with tqdm(total=total, unit="B", unit_scale=True, desc=spec["archive"], disable=not progress) as bar:
                    for block in iter(lambda: response.read(1 << 20), b""):
                        out.write(block)
                        bar.update(len(block))
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise OSError(f"could not download {name} from {url or spec['url']} ({exc}); "
                          f"fetch {spec['archive']} by hand into {root}") from None
        try:
            verify_md5(partial, md5)
        except ValueError:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(archive)
    extract_archive(archive, root)
    return root / spec["folder"]


# ------------------------------------------------------------------------------------------------ SVHN

SVHN_SPLITS = ("train", "test", "extra")


def load_svhn(root: str | Path, split: str = "train", *, dtype: torch.dtype = torch.float32) -> Split:
    """SVHN cropped digits from ``{root}/{split}_32x32.mat`` (label 10 means digit 0 and becomes 0)."""
    if split not in SVHN_SPLITS:
        raise ValueError(f"unknown SVHN split {split!r}; choose one of: {', '.join(SVHN_SPLITS)}")
    path = Path(root).expanduser()
    path = path if path.is_file() else path / f"{split}_32x32.mat"
    if not path.is_file():
        raise FileNotFoundError(
            f"SVHN file {path} not found: download {split}_32x32.mat from http://ufldl.stanford.edu/housenumbers/ into {root}"
        )
    import scipy.io

    try:
        mat = scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises several unrelated types for bad files
        raise ValueError(f"{path}: not a readable MATLAB .mat file ({type(exc).__name__}: {exc})") from None
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"{path}: expected variables 'X' and 'y', found {sorted(k for k in mat if not k.startswith('__'))}")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).astype(np.int64).reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != y.shape[0]:
        raise ValueError(f"{path}: expected uint8 X of shape (32, 32, 3, N) and N labels, got {x.dtype} {x.shape}, {y.shape}")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise ValueError(f"{path}: SVHN labels must be 1..10, found {y.min()}..{y.max()}")
    return _to_tensors(x.transpose(3, 0, 1, 2), np.where(y == 10, 0, y), dtype)


# ------------------------------------------------------------------------------------------------ 500K pseudo-labels


def load_pseudo_labeled(path: str | Path, *, dtype: torch.dtype = torch.uint8) -> Split:
    """The 500K pseudo-labelled TinyImages pickle (``ti_500K_pseudo_labeled.pickle``; keys ``data`` (N,32,32,3)
    uint8 and ``extrapolated_targets`` (N,)). Defaults to uint8 images: as float32 the set takes 6 GB."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"pseudo-labelled data {path} not found: download ti_500K_pseudo_labeled.pickle "
            "(Carmon et al. 2019, github.com/yaircarmon/semisup-adv) and pass its path"
        )
    what = str(path)
    obj = _str_keys(safe_unpickle(path.read_bytes(), what), what)
    if "data" not in obj or "extrapolated_targets" not in obj:
        raise ValueError(f"{what}: expected keys 'data' and 'extrapolated_targets', found {sorted(obj)}")
    data, targets = np.asarray(obj["data"]), np.asarray(obj["extrapolated_targets"]).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 4 or data.shape[3] != 3 or data.shape[0] != targets.shape[0]:
        raise ValueError(f"{what}: expected uint8 data (N, H, W, 3) with N targets, got {data.dtype} {data.shape}, {targets.shape}")
    return _to_tensors(data, targets, dtype)


# ------------------------------------------------------------------------------------------------ loader


def _derived_seed(seed: int, epoch: int, stream: int) -> int:
    """A 63-bit seed for (seed, epoch, stream): counter-based, so any position can be re-created."""
    words = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, epoch, stream]).generate_state(2, dtype=np.uint32)
    return int(words[0]) << 31 ^ int(words[1])


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int, flip: bool) -> torch.Tensor:
    """Per-sample random crop of the zero-padded batch and horizontal flip with probability 1/2.

    Runs on ``x``'s device; ``generator`` must live on the same device.
    """
    b, _, h, w = x.shape
    if padding > 0:
        offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator, device=x.device)
        padded = F.pad(x, (padding, padding, padding, padding))
        rows = (offsets[0, :, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (offsets[1, :, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chan, rows, cols]
    if flip:
        mask = torch.rand(b, generator=generator, device=x.device) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


class InMemoryLoader:
    """Batches from in-memory tensors: no workers, augmentation on the tensors' device, resumable.

    Each ``iter()`` runs the rest of the current epoch. All randomness (shuffle order, crops, flips) is
    derived from ``(seed, epoch, batch index)``, so ``state_dict()`` / ``load_state_dict()`` (epoch, batch
    index, seed) resume mid-epoch bit-exactly. uint8 images are converted to float32 in [0, 1] per batch.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 128, shuffle: bool = True,
                 augment: bool = False, seed: int = 0, *, crop_padding: int = 4, flip: bool = True,
                 drop_last: bool = False) -> None:
        if x.dim() != 4 or y.dim() != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(f"expected non-empty x (N, C, H, W) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.device != y.device:
            raise ValueError(f"x is on {x.device} but y on {y.device}; move both to one device first")
        if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8):
            raise TypeError(f"images must be floating point in [0, 1] or uint8, got {x.dtype}")
        if batch_size < 1 or crop_padding < 0:
            raise ValueError(f"batch_size must be >= 1 and crop_padding >= 0, got {batch_size}, {crop_padding}")
        if drop_last and x.shape[0] < batch_size:
            raise ValueError(f"drop_last with {x.shape[0]} samples < batch_size {batch_size} yields no batch")
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.augment, self.seed = batch_size, shuffle, augment, int(seed)
        self.crop_padding, self.flip, self.drop_last = crop_padding, flip, drop_last
        self.epoch, self.batch = 0, 0

    def __len__(self) -> int:
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def state_dict(self) -> dict[str, int]:
        """Position: the next batch to yield is batch ``batch`` of epoch ``epoch``."""
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "num_samples": int(self.x.shape[0])}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state.get("num_samples", self.x.shape[0])) != self.x.shape[0]:
            raise ValueError(f"loader state is for {state['num_samples']} samples but this loader holds {self.x.shape[0]}")
        if not 0 <= int(state["batch"]) <= len(self):
            raise ValueError(f"loader state batch {state['batch']} outside 0..{len(self)}")
        self.epoch, self.batch, self.seed = int(state["epoch"]), int(state["batch"]), int(state["seed"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batch = int(epoch), 0

    def _order(self) -> torch.Tensor:
        n = self.x.shape[0]
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(_derived_seed(self.seed, self.epoch, 0)))

    def _batch(self, index: torch.Tensor, batch_number: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = index.to(self.x.device)
        xb, yb = self.x[index], self.y[index]
        if xb.dtype == torch.uint8:
            xb = xb.to(torch.float32).div_(255.0)
        if self.augment and (self.crop_padding > 0 or self.flip):
            gen = torch.Generator(device=self.x.device).manual_seed(
                _derived_seed(self.seed, self.epoch, batch_number + 1))
            xb = random_crop_flip(xb, gen, self.crop_padding, self.flip)
        return xb, yb

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.batch >= len(self):  # the previous epoch was consumed to its end
            self.epoch, self.batch = self.epoch + 1, 0
        order = self._order()
        while self.batch < len(self):
            i = self.batch
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            self.batch = i + 1
            yield self._batch(index, i)
        self.epoch, self.batch = self.epoch + 1, 0
