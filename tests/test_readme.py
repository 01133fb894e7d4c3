"""The README's "Use" commands stay runnable: each one is parsed from README.md and run in a scaled-down form.

Scaling changes sizes only (fewer points, epochs, queries; a smaller input or budget; a checkpoint trained here
instead of the demo's; output folders in a temporary directory), never the flags the README shows, so a renamed
flag, subcommand, recipe or sweep file fails here. A README command whose subcommand has no scaling rule below
fails too: add one.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from experiments.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
QUICK_TRAIN = ["run.epochs=1", "data.train_limit=256", "attack.steps=2", "selection.pgd_steps=2", "run.progress=false"]


def readme_commands(path: Path = ROOT / "README.md", section: str = "## Use") -> list[list[str]]:
    """argv (without the program) of every archlip command in the first bash block of ``section``."""
    text = path.read_text()
    start = text.index(section)
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert block, f"no bash block under {section!r} in {path.name}"
    commands = []
    for line in block.group(1).splitlines():
        argv = shlex.split(line, comments=True)
        if argv and Path(argv[0]).name == "archlip":
            commands.append(argv[1:])
    return commands


def _option(argv: list[str], name: str, value: str) -> list[str]:
    """``argv`` with option ``name`` set to ``value`` (replaced if present, appended otherwise)."""
    out = list(argv)
    if name in out:
        out[out.index(name) + 1] = value
    else:
        out += [name, value]
    return out


def _paths(argv: list[str], tmp: Path, checkpoint: Path) -> list[str]:
    out = []
    for i, a in enumerate(argv):
        if a.endswith((".safetensors", ".pt")):
            a = str(checkpoint)
        elif (i > 0 and argv[i - 1] == "--out") or (argv[0] == "report" and i == 1):
            a = str(tmp / a)
        out.append(a)
    return out


def _scaled_sweep(argv: list[str], tmp: Path) -> list[str]:
    """The README's sweep file with one run of the grid and the quick training/analysis settings."""
    from experiments.sweep import load_sweep  # noqa: F401  (the sweep file must load as written)

    source = Path(argv[1]) if Path(argv[1]).exists() else ROOT / argv[1]
    spec = yaml.safe_load(source.read_text())
    spec["set"] = {**spec.get("set", {}), **dict(o.split("=", 1) for o in QUICK_TRAIN)}
    spec["set"] = {k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in spec["set"].items()}
    spec["grid"] = {k: v[:1] for k, v in spec["grid"].items()}
    spec["analysis"] = {"rtol": 0.2, "lower_points": 8, "lower_iters": 3, "attack_ratio_steps": 2}
    spec.setdefault("evaluate", {})["n"] = 16
    scaled = tmp / source.name
    scaled.write_text(yaml.safe_dump(spec))
    return _option(["sweep", str(scaled), *argv[2:]], "--max-runs", "1")


def scaled(argv: list[str], tmp: Path, checkpoint: Path) -> list[str]:
    """A cheap form of one README command (same subcommand and flags)."""
    argv = _paths(argv, tmp, checkpoint)
    command = argv[0]
    if command in ("list", "--version", "--help", "-h"):
        return argv
    if command == "demo":
        return argv if "--quick" in argv else [*argv, "--quick"]
    if command == "spectral":
        return _option(argv, "--input-shape", "3x8x8") if "--input-shape" in argv else argv
    if command == "bound":
        return _option(_option(argv, "--n", "8"), "--rtol", "0.2")
    if command == "theory":
        return _option(argv, "--budget", "2M") if "optimal-config" in argv else argv
    if command == "train":
        return [*argv, *[t for o in QUICK_TRAIN for t in ("--set", o)]]
    if command == "eval":
        attacks = argv[argv.index("--attacks") + 1].split(",") if "--attacks" in argv else []
        cheap = ",".join("aa-custom:apgd-ce" if a == "aa" else a for a in attacks) or "pgd20"
        return _option(_option(argv, "--attacks", cheap), "--n", "8")
    if command == "sweep":
        return _scaled_sweep(argv, tmp)
    if command == "report":
        return argv
    raise AssertionError(f"README command {command!r} has no scaled-down form in tests/test_readme.py: add one")


def test_readme_commands_parse_with_the_real_cli():
    commands = readme_commands()
    assert {c[0] for c in commands} >= {"spectral", "bound", "theory", "train", "eval", "sweep", "report"}
    parser = build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv)  # exits with status 2 on a flag or subcommand the CLI does not have
        except SystemExit as stop:  # --version / --help exit 0
            assert stop.code == 0, f"README command {' '.join(argv)!r} does not parse"


@pytest.mark.slow
def test_readme_commands_run_scaled_down(tmp_path, capsys, monkeypatch):
    """Every README command, in order, on a checkpoint trained here (the demo's recipe, one quick epoch)."""
    monkeypatch.chdir(tmp_path)  # commands without --out write under ./runs: not into the checkout (a rerun found them)
    checkpoint_dir = tmp_path / "ckpt"
    assert main(["train", "digits-pgdat-tiny", "--out", str(checkpoint_dir),
                 *[t for o in QUICK_TRAIN for t in ("--set", o)]]) == 0
    checkpoint = checkpoint_dir / "model_best.safetensors"
    assert checkpoint.is_file()
    for argv in readme_commands():
        cheap = scaled(argv, tmp_path, checkpoint)
        try:
            code = main(cheap)
        except SystemExit as stop:  # --version / --help
            code = stop.code
        err = capsys.readouterr().err
        assert code == 0, f"README command {' '.join(argv)!r} (run as {' '.join(cheap)!r}) failed: {err[-1500:]}"
