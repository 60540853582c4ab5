"""No kill or full disk loses a checkpoint: saves go to a temporary name in the checkpoint's own folder, are fsynced
and renamed over the old file; a full disk is one line naming the path; ``--ckpt_path last`` means the newest
last.ckpt of the run folder."""

from __future__ import annotations

import csv
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ovseg.cli import main
from ovseg.data.sa1b import write_synthetic_sa1b
from ovseg.data.synthetic import write_synthetic
from ovseg.utils.io import remove_stale_temps

REPO = Path(__file__).resolve().parents[2]
OTHER_FS_TMP = Path("/dev/shm")  # a tmpfs: another filesystem than the checkpoint folder's, as on a cluster

#: the child: ovseg's trainer for the tiny config, one small checkpoint saved, then a large one over it
SAVER = """
import sys, torch
from ovseg.runner import OVSegCLI
cli = OVSegCLI(args=["--config", sys.argv[1], "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"],
               run=False)
io = cli.trainer.strategy.checkpoint_io
io.save_checkpoint({"state_dict": {"w": torch.zeros(4)}, "n": 1}, sys.argv[2])
print("first saved", flush=True)
io.save_checkpoint({"state_dict": {"w": torch.ones(60_000_000)}, "n": 2}, sys.argv[2])
print("second saved", flush=True)
"""


@pytest.mark.skipif(not OTHER_FS_TMP.is_dir() or os.stat(OTHER_FS_TMP).st_dev == os.stat(REPO).st_dev,
                    reason="needs a temp folder on another filesystem")
@pytest.mark.parametrize("trial", range(2))
def test_a_kill_during_a_save_keeps_a_whole_checkpoint(tmp_path, trial):
    target = tmp_path / "checkpoints" / "last.ckpt"
    env = {**os.environ, "TMPDIR": str(OTHER_FS_TMP), "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", SAVER, str(REPO / "configs/tiny/maskclip.yaml"), str(target)],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "first saved"
        before = os.stat(target)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:  # kill at the first change to the file
            now = os.stat(target)
            if (now.st_ino, now.st_size, now.st_mtime_ns) != (before.st_ino, before.st_size, before.st_mtime_ns):
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    checkpoint = torch.load(target, weights_only=True)  # whole: the old one or the new one, never a piece
    assert checkpoint["n"] in (1, 2) and checkpoint["state_dict"]["w"].numel() in (4, 60_000_000)
    remove_stale_temps(target.parent)  # what the next save or `--ckpt_path last` does
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_synthetic_sa1b(root / "sa1b", num_images=4, seed=0)
    write_synthetic("voc20", root, num_images=2, seed=2)
    return root


def _fit_args(root: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["fit", "--config", str(REPO / "configs/tiny/pixelclip.yaml"), "--data.root", str(root),
            "--trainer.default_root_dir", str(out), "--trainer.max_steps", str(steps),
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.save_last=true", "--trainer.callbacks.every_n_train_steps=1", *extra]


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    root, out = _root(tmp_path), tmp_path / "runs"
    real_save, saves = torch.save, []

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        if hasattr(f, "fileno") or isinstance(f, (str, Path)):  # a file on disk (not an in-memory buffer)
            saves.append(f)
            if len(saves) > 2:  # step 1 writes epoch=0-step=1.ckpt and last.ckpt
                f.write(b"PK\x03\x04partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    monkeypatch.setattr(sys, "argv", ["ovseg", *_fit_args(root, out, 3)])
    assert main() == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("ovseg: error: ") and "no space left on device" in errors[0]
    folder = out / "lightning_logs/version_0/checkpoints"
    assert str(folder) in errors[0]
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temp files left
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 1  # the first save, whole


def _first_step(version_dir: Path) -> int:
    with open(version_dir / "metrics.csv") as f:
        return min(int(row["step"]) for row in csv.DictReader(f) if row.get("step"))


def test_ckpt_path_last_resumes_the_newest_run(tmp_path, monkeypatch, capsys):
    root, out = _root(tmp_path), tmp_path / "runs"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ovseg", *_fit_args(root, tmp_path / "empty", 3, "--ckpt_path", "last")])
    assert main() == 1
    err = capsys.readouterr().err
    assert f"--ckpt_path last: no last.ckpt in the runs under {tmp_path / 'empty'}" in err and len(
        err.strip().splitlines()) == 2  # the error and the OVSEG_DEBUG hint
    main(_fit_args(root, out, 2))
    main(_fit_args(root, out, 3, "--ckpt_path", "last"))
    resumed = out / "lightning_logs/version_1"
    assert _first_step(resumed) >= 2  # continued from step 2, not from scratch
    assert torch.load(resumed / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 3
