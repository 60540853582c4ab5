"""`ovseg fit` / `ovseg test` with PixelCLIP on a generated SA-1B folder: DDP, checkpoints, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from ovseg.cli import main
from ovseg.data.sa1b import write_synthetic_sa1b
from ovseg.data.synthetic import write_synthetic

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs/tiny/pixelclip.yaml")


@pytest.fixture
def sa1b_root(tmp_path):
    root = tmp_path / "data"
    write_synthetic_sa1b(root / "sa1b", num_images=8, seed=0)
    write_synthetic("voc20", root, num_images=2, seed=1)
    return root


def _args(root, out):
    return ["--config", TINY, "--data.root", str(root), "--trainer.default_root_dir", str(out),
            "--trainer.logger.init_args.save_dir", str(out)]


class ResumeProbe(L.Callback):
    """Saves what the resumed run starts from: step, optimizer state, teacher, learning rates."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        torch.save({
            "global_step": trainer.global_step,
            "optimizer": optimizer.state_dict(),
            "teacher": {k: v.clone() for k, v in pl_module.teacher.state_dict().items()},
            "lrs": [g["lr"] for g in optimizer.param_groups],
        }, self.path)


@pytest.mark.ddp
def test_two_process_fit_checkpoints_and_test_loads_it(sa1b_root, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "ovseg", "fit", *_args(sa1b_root, out), "--trainer.strategy", "ddp",
                           "--trainer.devices", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt_path = next(out.rglob("last.ckpt"))
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    # 8 images, 2 per process and step, 2 processes -> 2 steps per epoch; max_steps 4
    assert ckpt["global_step"] == 4
    assert "results_dir" not in ckpt["hyper_parameters"]  # evaluation settings come from the test command
    metrics = (next(out.rglob("metrics.csv"))).read_text()
    assert "val/voc20/mIoU" in metrics

    results_dir = tmp_path / "results"
    main(["test", *_args(sa1b_root, tmp_path / "test"), "--ckpt_path", str(ckpt_path),
          "--model.init_args.results_dir", str(results_dir)])
    results = json.loads((results_dir / "results.json").read_text())
    assert results["method"] == "PixelCLIP" and results["weights"] == f"checkpoint:{ckpt_path}"
    assert results["datasets"]["voc20"]["protocol"] == "pixelclip"
    assert results["datasets"]["voc20"]["num_images"] == 2


def test_resume_continues_at_saved_step_with_optimizer_and_ema_state(sa1b_root, tmp_path):
    out = tmp_path / "run"
    main(["fit", *_args(sa1b_root, out), "--trainer.max_steps", "2"])
    ckpt_path = next(out.rglob("last.ckpt"))
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    probe = tmp_path / "probe.pt"
    main(["fit", *_args(sa1b_root, out), "--trainer.max_steps", "4", "--ckpt_path", str(ckpt_path),
          "--trainer.callbacks+=tests.integration.test_pixelclip_fit.ResumeProbe",
          f"--trainer.callbacks.path={probe}"])
    start = torch.load(probe, weights_only=False)
    assert start["global_step"] == 2
    saved_state = ckpt["optimizer_states"][0]["state"]
    assert saved_state and start["optimizer"]["state"].keys() == saved_state.keys()
    for index, state in saved_state.items():
        torch.testing.assert_close(start["optimizer"]["state"][index]["exp_avg"], state["exp_avg"])
        assert int(start["optimizer"]["state"][index]["step"]) == 2
    teacher = {k[len("teacher."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("teacher.")}
    assert teacher.keys() == start["teacher"].keys()
    for key, value in teacher.items():
        assert torch.equal(start["teacher"][key], value), key
    initial = [g["initial_lr"] for g in ckpt["optimizer_states"][0]["param_groups"]]
    assert start["lrs"] == [g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"]]
    assert start["lrs"] != initial  # the cosine schedule went on from step 2
    final = torch.load(sorted(out.rglob("last.ckpt"), key=os.path.getmtime)[-1], map_location="cpu",
                       weights_only=False)
    assert final["global_step"] == 4


def test_broken_samples_are_left_out_and_counted(sa1b_root, tmp_path):
    """Finding 8: a broken SA-1B sample was replaced by its neighbour (trained on twice) and only warned about."""
    import csv

    broken = sorted((sa1b_root / "sa1b").rglob("*.json"))[3]
    broken.write_text('{"annotations": [')
    out = tmp_path / "out"
    main(["fit", *_args(sa1b_root, out), "--trainer.max_steps", "4", "--trainer.limit_val_batches", "0",
          "--trainer.enable_progress_bar", "false"])
    with open(out / "lightning_logs/version_0/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    # 8 images in 4 batches of 2: the batch holding the broken one has 1 sample, and the count is logged
    assert sum(float(r["train/skipped_samples_step"]) for r in rows if r.get("train/skipped_samples_step")) == 1
