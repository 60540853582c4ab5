"""benchmarks/gpu_check.sh and gpu_check.py on the CPU: the no-GPU line, the missing-package line, the failure path
(a failing, a hanging and a result-less step), the data-wait measure against a loader of known speed, and the
whole script in --cpu-smoke mode (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks/gpu_check.sh"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / f"benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bash(*args: str, env: dict | None = None, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    return proc, time.perf_counter() - start


@pytest.mark.parametrize("nvidia_smi", ["absent", "lists none"])
def test_without_a_gpu_it_says_so_in_one_line_and_fails(tmp_path, nvidia_smi):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if nvidia_smi == "absent" and shutil.which("nvidia-smi", path="/usr/bin:/bin"):
        pytest.skip("this machine has nvidia-smi in /usr/bin")
    if nvidia_smi == "lists none":
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    proc, seconds = _bash(env={"PATH": f"{bin_dir}:/usr/bin:/bin", "OUT": str(tmp_path / "out")})
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 3 and seconds < 60
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no GPU found")
    assert not (tmp_path / "out").exists()


def test_missing_packages_that_cannot_be_installed_are_named_in_one_line(tmp_path):
    # an interpreter with none of the dependencies, and no pip to install them with
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    proc, _ = _bash("--cpu-smoke", env={"PY": str(tmp_path / "bare/bin/python"), "OUT": str(tmp_path / "out")})
    errors = proc.stderr.strip().splitlines()
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert len(errors) == 1 and errors[0].startswith("gpu_check: ") and "lacks " in errors[0]
    assert all(name in errors[0] for name in ("torch>=", "open_clip_torch", "albumentations", "pycocotools"))
    assert not (tmp_path / "out").exists()


def test_a_new_venv_over_a_python3_that_is_itself_a_venv_sees_its_torch(tmp_path):
    # the GPU images' python3 is /opt/torch/.venv/bin/python3: `venv --system-site-packages` alone would reach its
    # base interpreter's packages, without torch. A copy of the script's files run with python3 = this test's venv
    # interpreter and a fake GPU
    root = tmp_path / "repo"
    for name in ("benchmarks/gpu_check.sh", "benchmarks/gpu_check.py", "pyproject.toml"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: fake'\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    proc = subprocess.run(["bash", str(root / "benchmarks/gpu_check.sh")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                                            "GPU_CHECK_INSTALL": "0", "OUT": str(tmp_path / "out")})
    assert (root / ".venv/bin/python").exists(), proc.stderr
    assert "lacks" not in proc.stderr, proc.stderr
    record = json.loads((tmp_path / "out/gpu_check.json").read_text())
    import torch

    env = record["steps"]["env"]
    assert env["result"]["torch"] == torch.__version__  # imported from the machine's packages
    # no CUDA here: env fails, saying why, and nothing after it runs
    assert proc.returncode == 1 and env["output_tail"] == f"torch {torch.__version__} sees no CUDA device"


def test_a_record_cut_short_names_the_steps_it_did_not_reach():
    gpu_check = _module("gpu_check")
    record = {"mode": "gpu", "started": "2026-12-04T00:00:00", "budget_s": 480, "ok": False,
              "steps": {"env": {"status": "ok", "seconds": 1.0, "result": {"torch": "2"}},
                        "data_half": {"status": "failed", "seconds": 1.0}}}
    summary = gpu_check.report(record).splitlines()[0]
    assert "FAILED: data_half;" in summary and "not run: data_raw, step, data_wait, inference." in summary


def test_missing_lists_only_what_is_not_installed(tmp_path):
    gpu_check = _module("gpu_check")
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = [\n    "numpy>=1",  # a comment\n'
                         '    "no-such-distribution-xyz>=0.1",\n    "jsonargparse[signatures]>=4",\n]\n')
    assert gpu_check.missing_requirements(pyproject) == ["no-such-distribution-xyz>=0.1"]


def test_failed_hung_and_resultless_steps_fail_the_run_loudly(tmp_path, monkeypatch, capsys):
    gpu_check = _module("gpu_check")
    pid_file = tmp_path / "grandchild.pid"
    hang = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(120)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    monkeypatch.setattr(gpu_check, "STEPS", {
        "env": (1, ["-c", "print('{\"torch\": \"2\"}')"]),
        "fails": (1, ["-c", "import sys; print('boom'); sys.exit(3)"]),
        "hangs": (1, ["-c", hang]),
        "no_result": (1, ["-c", "print('done')"]),
        "writes": (1, ["-c", "import json; open('{out}/writes.json', 'w').write(json.dumps({'x': 1}))"]),
    })
    monkeypatch.setattr(gpu_check, "SMOKE", {})
    monkeypatch.setattr(gpu_check, "SMOKE_BUDGET", 4)
    start = time.perf_counter()
    rc = gpu_check.run_all(tmp_path / "out", tmp_path / "data", smoke=True)
    assert rc == 1 and time.perf_counter() - start < 30
    record = json.loads((tmp_path / "out/gpu_check.json").read_text())
    assert {name: step["status"] for name, step in record["steps"].items()} == {
        "env": "ok", "fails": "failed", "hangs": "timed out", "no_result": "failed", "writes": "ok"}
    assert record["ok"] is False and record["steps"]["writes"]["result"] == {"x": 1}
    assert record["steps"]["fails"]["rc"] == 3 and "boom" in record["steps"]["fails"]["output_tail"]
    err = capsys.readouterr().err
    assert "gpu_check: FAILED: fails (failed), hangs (timed out), no_result (failed)" in err
    assert "boom" in (tmp_path / "out/gpu_check.log").read_text()
    summary = gpu_check.report(record).splitlines()[0]
    assert "FAILED: fails, hangs, no_result" in summary and "torch 2;" in summary
    # the hung step's own child was killed with it (its process group)
    grandchild = int(pid_file.read_text())
    deadline = time.time() + 5
    while time.time() < deadline and Path(f"/proc/{grandchild}").exists() and \
            "Z" not in Path(f"/proc/{grandchild}/stat").read_text().split()[2]:
        time.sleep(0.1)
    assert not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]


class _SlowSamples:
    """A dataset whose every sample takes ``seconds`` (the loader's known speed)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __len__(self) -> int:
        return 1000

    def __getitem__(self, index: int) -> int:
        time.sleep(self.seconds)
        return index


class _FixedStep:
    """Stands in for StepTimer: a step of ``seconds`` of compute after fetching its batch; the first (warm-up) step
    takes ``warmup`` seconds, as a GPU's first step does, long enough for the workers to fill the prefetch buffer."""

    def __init__(self, seconds: float, warmup: float):
        self.seconds, self.warmup = seconds, warmup

    def to_device(self, batch):
        return batch

    def __call__(self, next_batch) -> list[float]:
        start = time.perf_counter()
        next_batch()
        load = time.perf_counter() - start
        time.sleep(self.warmup or self.seconds)
        self.warmup = 0.0
        return [load, self.seconds]


def test_data_wait_is_measured_from_an_empty_prefetch_buffer():
    """4 workers at 80 ms a sample (50 batches/s) feeding a 10 ms step: in steady state the step waits half the
    time. The 8 batches prefetched during the warm-up must not hide it (16 timed steps from a full buffer read
    about 0.25)."""
    from torch.utils.data import DataLoader

    bench = _module("bench_pixelclip")
    loader = DataLoader(_SlowSamples(0.08), batch_size=1, num_workers=4, persistent_workers=True)
    result = bench.wait_run(_FixedStep(0.01, warmup=1.0), loader, workers=4, steps=16)
    assert result["prefetch_buffer"] == 8 and result["timed_steps"] == 16
    assert 38 <= result["loader_samples_per_s"] <= 60, result
    assert 0.4 <= result["data_wait_share"] <= 0.65, result


@pytest.mark.slow
def test_cpu_smoke_runs_every_step_and_writes_the_json(tmp_path):
    proc, _ = _bash("--cpu-smoke", env={"OUT": str(tmp_path / "out")}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "out/gpu_check.json").read_text())
    gpu_check = _module("gpu_check")
    assert record["ok"] and list(record["steps"]) == list(gpu_check.STEPS)
    assert all(step["status"] == "ok" and "result" in step for step in record["steps"].values())
    runs = record["steps"]["data_wait"]["result"]["runs"]
    assert [r["precision"] for r in runs] == ["fp32", "bf16"] and all(0 <= r["data_wait_share"] <= 1 for r in runs)
    assert record["steps"]["data_wait"]["result"]["downscale"] == 0.5
    report = gpu_check.report(record)
    assert "| **step** |" in report and "| bf16 | 2 |" in report and "maskclip_whole_images_per_s" in report
