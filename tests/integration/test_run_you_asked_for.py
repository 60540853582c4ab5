"""The run you asked for is the run you get (issue 26 §5): a checkpoint of another model shape is refused naming
both, ``--trainer.default_root_dir`` moves runs of configs that declare their own logger, two runs never share a
run folder or silently overwrite each other's results."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ovseg.cli import main
from ovseg.runner import DEFAULT_ROOT_DIR, OVSegCLI

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs/tiny/maskclip.yaml")


def _one_error(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ovseg: error:")]
    assert len(errors) == 1, errors
    return errors[0]


def test_a_checkpoint_of_another_model_shape_is_refused_naming_both(tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "tiny_clips4.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {
        "_class_path": "ovseg.methods.CLIPS4", "clip": {"name": "tiny-vit", "pretrained": None},
        "backbone": {"class_path": "ovseg.methods.clips4.CLIPDenseEncoder", "init_args": {"head_dim": 16}}}}, ckpt)
    monkeypatch.setattr(sys, "argv", ["ovseg", "test", "--config", str(REPO / "configs/clips4_voc.yaml"),
                                      "--data.root", str(tmp_path), "--ckpt_path", str(ckpt)])
    assert main() == 1
    error = _one_error(capsys)
    assert str(ckpt) in error and "clip.name=tiny-vit" in error and "clip.name=ViT-B-16" in error


def test_a_checkpoint_of_the_configs_model_passes_the_shape_check(tmp_path):
    from ovseg.runner import check_checkpoint_shapes

    ckpt = tmp_path / "same.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {
        "_class_path": "ovseg.methods.CLIPS4", "clip": {"name": "tiny-vit"},
        "backbone": {"class_path": "ovseg.methods.clips4.backbones.CLIPDenseEncoder", "init_args": {"head_dim": 16}}}},
        ckpt)
    config = {"class_path": "ovseg.methods.CLIPS4", "init_args": {  # the class spelled by its package
        "clip": {"name": "tiny-vit"}, "backbone": {"class_path": "ovseg.methods.clips4.CLIPDenseEncoder",
                                                   "init_args": {"head_dim": 16}}}}
    check_checkpoint_shapes(ckpt, config)
    config["init_args"]["backbone"]["init_args"]["head_dim"] = 32
    with pytest.raises(ValueError, match="backbone.head_dim=16 in the checkpoint, backbone.head_dim=32 in the config"):
        check_checkpoint_shapes(ckpt, config)


def test_configs_that_declare_a_logger_follow_default_root_dir(tmp_path):
    declared = []
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        logger = (yaml.safe_load(path.read_text()) or {}).get("trainer", {}) or {}
        logger = logger.get("logger") if isinstance(logger, dict) else None
        if isinstance(logger, dict) and "save_dir" in (logger.get("init_args") or {}):
            declared.append(path.name)
            assert logger["init_args"]["save_dir"] == DEFAULT_ROOT_DIR, path
    assert "clips4_voc.yaml" in declared and "clips4.yaml" in declared
    cli = OVSegCLI(args=["--config", str(REPO / "configs/toyworld/clips4.yaml"),
                         "--trainer.default_root_dir", str(tmp_path / "runs")], run=False)
    assert Path(cli.trainer.logger.log_dir).parent == tmp_path / "runs" / "toyworld_clips4"


def test_runs_started_together_get_their_own_folders(tmp_path):
    clis = [OVSegCLI(args=["--config", TINY, "--trainer.default_root_dir", str(tmp_path)], run=False)
            for _ in range(3)]  # each built before any of them logged a line
    assert sorted(cli.trainer.logger.version for cli in clis) == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0", "version_1", "version_2"]


def test_results_dir_of_a_running_test_is_refused_and_an_old_one_replaced_with_a_warning(
        synthetic_root, tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    results.mkdir()
    claim = results / ".ovseg-results.claim"
    claim.write_text(f"{socket.gethostname().split('.')[0]}-1")  # pid 1 is alive: a test writing here now
    args = ["ovseg", "test", "--config", TINY, "--data.root", str(synthetic_root), "--data.datasets", "[voc21]",
            "--trainer.default_root_dir", str(tmp_path / "runs"), "--model.init_args.results_dir", str(results),
            "--trainer.enable_progress_bar", "false"]
    monkeypatch.setattr(sys, "argv", args)
    assert main() == 1
    assert f"results folder {results}: another run" in _one_error(capsys)
    assert not (results / "results.json").exists()
    claim.unlink()
    main(args[1:])
    assert (results / "results.json").is_file() and not claim.exists()
    with pytest.warns(UserWarning, match="holds the results of an earlier run"):
        main(args[1:])
