"""CLIP-S4 end to end with the tiny config: fit (1 and 2 processes), checkpoint, resume, test, and the
held-out-fold training vocabulary."""

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
from ovseg.data.folds import fold_classes, known_classes
from ovseg.data.synthetic import write_synthetic
from ovseg.data.specs import get_spec

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs/tiny/clips4.yaml")




def _fit(root, out, *extra):
    return OVSegCLI(args=["fit", "--config", TINY, "--data.root", str(root), *out_args(out), *extra])


def test_fit_checkpoints_and_test_scores_known_classes(voc_root, tmp_path):
    cli = _fit(voc_root, tmp_path / "fit", "--trainer.max_steps", "2")
    assert cli.trainer.global_step == 2
    ckpt = tmp_path / "fit/lightning_logs/version_0/checkpoints/last.ckpt"
    assert ckpt.is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert bool(state["state_dict"]["unknown.initialized"])  # unknown_init_segments: 4 in the tiny config
    main(["test", "--config", TINY, "--data.root", str(voc_root), "--ckpt_path", str(ckpt),
          "--model.init_args.results_dir", str(tmp_path / "res"), *out_args(tmp_path / "test")])
    results = json.loads((tmp_path / "res/results.json").read_text())
    voc = results["datasets"]["voc21"]
    assert results["method"] == "CLIPS4" and voc["protocol"] == "maskclip"
    # known/unknown are the dataset's own classes, whatever spelling the protocol's class-name file uses
    assert len(voc["class_names"]) == 21
    assert voc["known_classes"] == [c[0] for c in get_spec("voc21").class_names[1:]] and voc["unknown_classes"] == []
    assert voc["known_mIoU"] is not None and voc["hIoU"] is None


def test_resume_continues_from_the_checkpoint(voc_root, tmp_path):
    _fit(voc_root, tmp_path / "a", "--trainer.max_steps", "2")
    ckpt = tmp_path / "a/lightning_logs/version_0/checkpoints/last.ckpt"
    first = torch.load(ckpt, map_location="cpu", weights_only=False)
    cli = _fit(voc_root, tmp_path / "b", "--trainer.max_steps", "4", "--ckpt_path", str(ckpt))
    assert cli.trainer.global_step == 4
    # the run started from the checkpoint: prototypes/optimizer restored, then moved on
    lr = cli.trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.0)  # poly schedule reached its end at step 4 of 4 (not restarted)
    assert bool(cli.model.unknown.initialized)
    head = "backbone.head.refine.6.weight"
    assert not torch.equal(cli.model.state_dict()[head], first["state_dict"][head])


def test_fold_training_never_encodes_the_held_out_names(tmp_path):
    root = tmp_path / "data"
    write_synthetic("context59", root, split="train", num_images=3, seed=3)
    write_synthetic("context59", root, split="val", num_images=2, seed=4)
    fold = 2
    cli = _fit(root, tmp_path / "fit", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
               "--model.init_args.known_classes", f"context59-fold{fold}", "--model.init_args.strict_vocabulary",
               "true", "--data.init_args.train.init_args.dataset", "context59",
               "--data.init_args.train.init_args.split", "train", "--data.datasets", "[context59]")
    model = cli.model
    assert cli.trainer.global_step == 2
    held_out = set(fold_classes(fold))
    encoded = set(model.encoded_prompts)
    assert encoded == {f"a photo of a {n}." for n in known_classes(fold)}
    assert not any(p == f"a photo of a {n}." for p in encoded for n in held_out)
    assert not held_out & set(model.known_names)
    # scored with all 59 names: held-out classes are reported as unknown
    ckpt = tmp_path / "fit/lightning_logs/version_0/checkpoints/last.ckpt"
    main(["test", "--config", TINY, "--data.root", str(root), "--ckpt_path", str(ckpt), "--data.datasets",
          "[context59]", "--model.init_args.results_dir", str(tmp_path / "res"), *out_args(tmp_path / "test")])
    entry = json.loads((tmp_path / "res/results.json").read_text())["datasets"]["context59"]
    assert entry["unknown_classes"] == fold_classes(fold) and entry["known_classes"] == known_classes(fold)
    assert {"known_mIoU", "unknown_mIoU", "hIoU"} <= set(entry)


def _subprocess_fit(root, out, extra=()):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "offline",
           "OVSEG_DEBUG": "1"}
    cmd = [sys.executable, "-m", "ovseg", "fit", "--config", TINY, "--data.root", str(root), *out_args(out),
           "--trainer.max_steps", "2", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.ddp
@pytest.mark.slow  # ~40 s on 2 shared CPU cores
def test_two_process_ddp_fit_checkpoints_and_resumes(voc_root, tmp_path):
    proc = _subprocess_fit(voc_root, tmp_path / "ddp", ["--trainer.strategy", "ddp", "--trainer.devices", "2"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = tmp_path / "ddp/lightning_logs/version_0/checkpoints/last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 2 and bool(state["state_dict"]["unknown.initialized"])
    cli = _fit(voc_root, tmp_path / "resume", "--trainer.max_steps", "3", "--ckpt_path", str(ckpt))
    assert cli.trainer.global_step == 3
