"""Evaluation settings belong to the test command: ``ovseg test --ckpt_path CKPT --model.init_args.<setting> X``
evaluates with X, whatever the training run that wrote CKPT was given."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ovseg.eval.session import EvaluationSettings
from ovseg.runner import OVSegCLI

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs/tiny/maskclip.yaml")

#: every evaluation setting: (value given to the training run, value given to the test command)
TRAIN_AND_TEST_VALUES = {
    "protocol": ("sclip", "naclip"),
    "protocol_overrides": ({"short_side": 64, "templates": "single"}, {"short_side": 32}),
    "window_batch_size": (3, 5),
    "results_dir": ("/train/results", "/test/results"),
    "predict_dir": ("/train/predictions", "/test/predictions"),
    "gallery_size": (3, 0),
}


def cli_args(values: dict) -> list[str]:
    return [a for name, value in values.items() for a in (f"--model.init_args.{name}", str(value))]


class BuildOnly(OVSegCLI):
    """``ovseg test …`` up to the built method and Trainer; nothing is evaluated."""

    def _run_subcommand(self, subcommand: str) -> None:
        pass


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of a method trained with the first value of every evaluation setting."""
    trained = {name: train for name, (train, _) in TRAIN_AND_TEST_VALUES.items()}
    method = OVSegCLI(args=["--config", TINY, *cli_args(trained)], run=False).model
    checkpoint = {"state_dict": method.state_dict(), "hyper_parameters": dict(method.hparams)}
    method.on_save_checkpoint(checkpoint)
    path = tmp_path_factory.mktemp("ckpt") / "trained.ckpt"
    torch.save(checkpoint, path)
    return path


def test_the_values_cover_every_evaluation_setting():
    assert set(TRAIN_AND_TEST_VALUES) == {f.name for f in dataclasses.fields(EvaluationSettings)}


@pytest.mark.parametrize("name", sorted(TRAIN_AND_TEST_VALUES))
def test_a_setting_given_at_test_time_wins_over_the_checkpoint(name, checkpoint, tmp_path):
    _, tested = TRAIN_AND_TEST_VALUES[name]
    cli = BuildOnly(args=["test", "--config", TINY, "--ckpt_path", str(checkpoint), "--data.root", str(tmp_path),
                          "--trainer.default_root_dir", str(tmp_path), *cli_args({name: tested})])
    assert getattr(cli.model.evaluation.settings, name) == tested
