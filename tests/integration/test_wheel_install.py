"""The package built as a wheel and installed into a fresh virtual environment (its dependencies reused from this
one) works away from the checkout: ``ovseg test`` scores a tiny model, the data it needs inside the package
(protocols, class names, model configs) ships with it, and the project files it does not ship are looked up in
the project folder given, never beside the installed package."""

import json
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from ovseg.data.synthetic import write_synthetic

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The python of a fresh venv holding the ovseg wheel (and, through a .pth file, this venv's dependencies)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(REPO / "ovseg", source / "ovseg", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp / "dist"), str(source)], check=True)
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    target = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip())
    (wheel,) = (tmp / "dist").glob("ovseg-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                    str(wheel)], check=True)
    (target / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def run(python: Path, code: str, cwd: Path, **env: str) -> str:
    return subprocess.run([str(python), "-c", code], cwd=cwd, capture_output=True, text=True, check=True,
                          env={"HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "PATH": "/usr/bin:/bin",
                               **env}).stdout


def test_the_installed_wheel_scores_a_tiny_model_away_from_the_checkout(installed, tmp_path):
    write_synthetic("voc21", tmp_path / "data", num_images=2, size=(40, 56), seed=3)
    located = run(installed, "import ovseg; print(ovseg.__file__)", tmp_path)
    assert located.startswith(str(installed.parents[1])), located
    subprocess.run([str(installed), "-m", "ovseg", "test", "--config", str(REPO / "configs/tiny/maskclip.yaml"),
                    "--data.root", "data", "--data.datasets", "[voc21]", "--trainer.default_root_dir", "runs",
                    "--model.init_args.results_dir", "results", "--trainer.enable_progress_bar", "false"],
                   cwd=tmp_path, check=True, capture_output=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                                       "NO_ALBUMENTATIONS_UPDATE": "1"})
    results = json.loads((tmp_path / "results/results.json").read_text())
    assert results["datasets"]["voc21"]["num_images"] == 2 and results["protocol"]["name"] == "maskclip"


def test_the_installed_wheel_looks_up_project_files_in_the_project_only(installed, tmp_path):
    lookups = ("from ovseg.utils.project import checkout, project_path; from ovseg.toyworld.leaderboard import CONFIGS;"
               "from ovseg.bench.metafile import default_metafile_dir; "
               "print(checkout(), CONFIGS, project_path('configs/clips4_context.yaml'), default_metafile_dir())")
    assert run(installed, lookups, tmp_path).split() == [
        "None", "configs/toyworld", "configs/clips4_context.yaml", "benchmarks/metafiles"]
    assert run(installed, lookups, tmp_path, OVSEG_PROJECT=str(REPO)).split() == [
        "None", str(REPO / "configs/toyworld"), str(REPO / "configs/clips4_context.yaml"),
        str(REPO / "benchmarks/metafiles")]
