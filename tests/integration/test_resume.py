"""A fit killed with SIGKILL mid-epoch and resumed from last.ckpt is the run it would have been: every logged loss
and the final weights equal an uninterrupted run's (same seed, CPU; one process and two with gloo)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ovseg.data.sa1b import write_synthetic_sa1b
from ovseg.data.synthetic import write_synthetic

REPO = Path(__file__).resolve().parents[2]
STEPS, KILL_AT = 6, 3  # 8 training samples, batch 2 (per process): epochs of 4 (1 process) or 2 (2) steps


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_synthetic_sa1b(root / "sa1b", num_images=8, seed=0)
    write_synthetic("voc_aug", root, split="trainaug", num_images=8, seed=1)
    write_synthetic("voc20", root, num_images=2, seed=2)
    write_synthetic("voc21", root, num_images=2, seed=3)
    return root


def _fit(config: str, root: Path, out: Path, *extra: str, devices: int = 1) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ovseg", "fit", "--config", str(REPO / config), "--data.root", str(root),
           "--trainer.default_root_dir", str(out), "--trainer.max_steps", str(STEPS),
           "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
           "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
           "--trainer.callbacks.save_last=true", "--trainer.callbacks.every_n_train_steps=1",
           "--trainer.devices", str(devices), *extra]
    if devices > 1:
        cmd += ["--trainer.strategy", "ddp"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _losses(version_dir: Path) -> dict[int, dict[str, float]]:
    with open(version_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("step")]
    out: dict[int, dict[str, float]] = {}
    for row in rows:
        values = {k: float(v) for k, v in row.items() if k.startswith("train/") and v not in ("", None)}
        if values:
            out.setdefault(int(row["step"]), {}).update(values)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("config, devices", [("configs/tiny/pixelclip.yaml", 1), ("configs/tiny/clips4.yaml", 1),
                                             ("configs/tiny/clips4.yaml", 2), ("configs/tiny/maskclip_plus.yaml", 1),
                                             ("configs/tiny/maskclip_plus.yaml", 2)])
def test_killed_and_resumed_fit_equals_the_uninterrupted_run(tmp_path, config, devices):
    root = _root(tmp_path)
    full = _fit(config, root, tmp_path / "full", devices=devices)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _fit(config, root, tmp_path / "cut", "--trainer.callbacks+=tests.integration.resume_support.KillAtStep",
                  f"--trainer.callbacks.step={KILL_AT}", devices=devices)
    assert killed.returncode != 0  # SIGKILL: no clean-up ran
    last = tmp_path / "cut/lightning_logs/version_0/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == KILL_AT
    resumed = _fit(config, root, tmp_path / "cut", "--ckpt_path", str(last), devices=devices)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected = _losses(tmp_path / "full/lightning_logs/version_0")
    got = {**_losses(tmp_path / "cut/lightning_logs/version_0"), **_losses(tmp_path / "cut/lightning_logs/version_1")}
    assert sorted(expected) == sorted(got) and len(expected) >= STEPS - 1
    assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True)  # every loss, bit for bit
    final = torch.load(tmp_path / "full/lightning_logs/version_0/checkpoints/last.ckpt", weights_only=False)
    again = torch.load(tmp_path / "cut/lightning_logs/version_1/checkpoints/last.ckpt", weights_only=False)
    assert final["global_step"] == again["global_step"] == STEPS
    assert final["state_dict"].keys() == again["state_dict"].keys()
    for key, value in final["state_dict"].items():
        assert torch.equal(value, again["state_dict"][key]), key
