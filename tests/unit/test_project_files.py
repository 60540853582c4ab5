"""Project files the package does not hold (``configs/``, ``benchmarks/``) are looked up explicitly:
``$OVSEG_PROJECT``, then the current folder, then the checkout the package runs from."""

from pathlib import Path

from ovseg.bench.folds import run_folds
from ovseg.utils.project import PROJECT_ENV, checkout, project_path

REPO = Path(__file__).resolve().parents[2]


def test_the_project_folder_then_the_current_folder_then_the_checkout(tmp_path, monkeypatch):
    (tmp_path / "mine/configs").mkdir(parents=True)
    (tmp_path / "here/configs").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "here")
    monkeypatch.setenv(PROJECT_ENV, str(tmp_path / "mine"))
    assert project_path("configs") == tmp_path / "mine/configs"
    monkeypatch.delenv(PROJECT_ENV)
    assert project_path("configs") == tmp_path / "here/configs"
    assert checkout() == REPO and project_path("benchmarks/suites") == REPO / "benchmarks/suites"
    assert project_path("configs/none.yaml") == Path("configs/none.yaml")  # errors name what to create


def test_folds_find_their_default_config_in_the_project(tmp_path, monkeypatch):
    """The fold runs use ``configs/clips4_context.yaml`` of the project given, not of the package's location."""
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "configs/clips4_context.yaml").write_text("seed_everything: 0\n")
    monkeypatch.setenv(PROJECT_ENV, str(project))
    ran = []
    monkeypatch.setattr("ovseg.runner.read_checkpoint_hparams", lambda ckpt: {"known_classes": ckpt})
    monkeypatch.setattr("ovseg.runner.run_trainer", lambda command, args: ran.append(args[1]))
    monkeypatch.setattr("ovseg.bench.folds.write_report", lambda paths, out: None)
    run_folds(str(tmp_path), [f"context59-fold{i}" for i in range(4)], tmp_path / "out")
    assert ran == [str(project / "configs/clips4_context.yaml")] * 4
