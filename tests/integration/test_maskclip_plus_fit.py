"""MaskCLIP+ end to end with the tiny config: fit (1 and 2 processes), checkpoint, resume, test."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ovseg.cli import main
from tests.integration.conftest import out_args
from ovseg.runner import OVSegCLI

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs/tiny/maskclip_plus.yaml")


def test_fit_checkpoints_resumes_and_test_scores(voc_root, tmp_path):
    cli = OVSegCLI(args=["fit", "--config", TINY, "--data.root", str(voc_root), *out_args(tmp_path / "fit"),
                         "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"])
    assert cli.trainer.global_step == 2
    ckpt = tmp_path / "fit/lightning_logs/version_0/checkpoints/last.ckpt"
    first = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert first["hyper_parameters"]["student"]["init_args"]["head"] == "aspp_v2"
    cli = OVSegCLI(args=["fit", "--config", TINY, "--data.root", str(voc_root), *out_args(tmp_path / "more"),
                         "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--ckpt_path", str(ckpt)])
    assert cli.trainer.global_step == 3
    key = "student.head.branches.0.0.weight"
    assert not torch.equal(cli.model.state_dict()[key], first["state_dict"][key])
    main(["test", "--config", TINY, "--data.root", str(voc_root), "--ckpt_path", str(ckpt),
          "--model.init_args.results_dir", str(tmp_path / "res"), *out_args(tmp_path / "test")])
    results = json.loads((tmp_path / "res/results.json").read_text())
    assert results["method"] == "MaskCLIPPlus" and results["datasets"]["voc21"]["protocol"] == "maskclip"
    assert results["datasets"]["voc21"]["mIoU"] is not None


@pytest.mark.ddp
@pytest.mark.slow  # ~60 s on 2 shared CPU cores
def test_two_process_ddp_fit_checkpoints(voc_root, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "ovseg", "fit", "--config", TINY, "--data.root", str(voc_root),
           *out_args(tmp_path / "ddp"), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
           "--trainer.strategy", "ddp", "--trainer.devices", "2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = torch.load(tmp_path / "ddp/lightning_logs/version_0/checkpoints/last.ckpt", map_location="cpu",
                       weights_only=False)
    assert state["global_step"] == 2
