"""The measurements of ``benchmarks/gpu_check.sh``, each a subprocess with its own time budget, and their report.

    python benchmarks/gpu_check.py run --out DIR [--cpu-smoke]   # every step; DIR/gpu_check.json + gpu_check.log
    python benchmarks/gpu_check.py report DIR/gpu_check.json     # the benchmarks/README.md tables from the JSON
    python benchmarks/gpu_check.py missing                       # pyproject dependencies not installed, one line

Steps (``STEPS``): generate the SA-1B-like data once (halved size, and raw size for the shipped config's halving at
read time), the PixelCLIP ViT-B/16 training step in float32 (TF32) and bf16 autocast with its parts timed, the data
wait with N loader workers on the shipped data path, and MaskCLIP ViT-B/16 evaluation images/s per protocol.
``--cpu-smoke`` runs the same steps at toy size on the CPU (tiny model, a few small images), to check the script.

Every step runs to its budget at most (killed beyond it, with its process group); a failed or timed-out step is
recorded in the JSON with the tail of its output, the remaining steps still run, and the exit code is 1. Standard
library only at import: ``missing`` runs before the dependencies are installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIXELCLIP = "benchmarks/bench_pixelclip.py"

#: name -> (budget in seconds, arguments after the Python interpreter); {data} is the data folder, {out} the output
#: folder. The budgets add up to 8 min (one H100/H200): what the step needed on the slower of two H200 hosts
#: (2026-12-04; the data steps are CPU-bound and host CPUs differ 2x) with a margin.
STEPS = {
    "env": (15, ["-c", "import json, sys, torch; print(json.dumps({'python': sys.version.split()[0], "
                       "'torch': torch.__version__, 'cuda': torch.version.cuda, 'cuda_available': "
                       "torch.cuda.is_available(), 'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() "
                       "else None}))"]),
    "data_half": (35, [PIXELCLIP, "data", "--data", "{data}/half", "--images", "32", "--size", "750x1125",
                       "--masks", "100", "--json", "{out}/data_half.json"]),
    "data_raw": (35, [PIXELCLIP, "data", "--data", "{data}/raw", "--images", "12", "--size", "1500x2250",
                      "--masks", "100", "--json", "{out}/data_raw.json"]),
    # the training step at batch 12, 640² crops from 750x1125 images (SA-1B halved), load in the step
    "step": (75, [PIXELCLIP, "step", "--model", "vitb16", "--device", "cuda", "--batch", "12", "--crop", "640",
                  "--resize-short", "1024", "--data", "{data}/half", "--size", "750x1125", "--masks", "100",
                  "--steps", "8", "--precision", "fp32,bf16", "--workers", "0", "--json", "{out}/step.json"]),
    # the shipped data path (raw download halved at read time) with N workers, the buffer empty when timing starts
    "data_wait": (240, [PIXELCLIP, "step", "--model", "vitb16", "--device", "cuda", "--batch", "12", "--crop",
                        "640", "--resize-short", "1024", "--data", "{data}/raw", "--downscale", "0.5", "--size",
                        "1500x2250", "--masks", "100", "--steps", "24", "--precision", "fp32,bf16", "--workers",
                        "4,8,12", "--json", "{out}/data_wait.json"]),
    "inference": (80, ["benchmarks/bench_inference.py", "--models", "vitb16", "--device", "cuda", "--protocols",
                        "--batching", "--json", "{out}/inference.json"]),
}
#: the same steps at toy size on the CPU (``--cpu-smoke``): the arguments replaced, in order
SMOKE = {
    "data_half": {"--images": "4", "--size": "96x128", "--masks": "8", "--procs": "2"},
    "data_raw": {"--images": "2", "--size": "192x256", "--masks": "8", "--procs": "2"},
    "step": {"--model": "tiny", "--device": "cpu", "--batch": "2", "--crop": "64", "--resize-short": "96",
             "--size": "96x128", "--masks": "8", "--steps": "1"},
    "data_wait": {"--model": "tiny", "--device": "cpu", "--batch": "2", "--crop": "64", "--resize-short": "96",
                  "--size": "192x256", "--masks": "8", "--steps": "2", "--workers": "2"},
    "inference": {"--models": "tiny", "--device": "cpu", "--memory-size": "128x256", "--repeats": "1"},
}
SMOKE_BUDGET = 240  # seconds per step on a loaded 2-core CPU


def step_commands(smoke: bool, data: Path, out: Path) -> dict[str, tuple[int, list[str]]]:
    """name -> (budget, argv after the interpreter) of each step, in order."""
    steps = {}
    for name, (budget, args) in STEPS.items():
        args = [a.replace("{data}", str(data)).replace("{out}", str(out)) for a in args]
        if smoke:
            budget = SMOKE_BUDGET
            for key, value in SMOKE.get(name, {}).items():
                if key in args:
                    args[args.index(key) + 1] = value
                else:
                    args += [key, value]
        steps[name] = (budget, args)
    return steps


def run_step(python: str, args: list[str], budget: float, log) -> tuple[str, int | None, float, str]:
    """(status, exit code, seconds, output tail) of one step run under ``budget`` seconds; its output goes to
    ``log`` and the console. A step past its budget is killed with its process group."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen([python, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    tail: list[str] = []
    timed_out = False

    def kill(*_):
        nonlocal timed_out
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    import threading

    timer = threading.Timer(budget, kill)
    timer.start()
    try:
        for line in proc.stdout:
            if "No pretrained weights loaded" in line:
                continue
            log.write(line)
            sys.stdout.write(line)
            tail = (tail + [line.rstrip()])[-15:]
        rc = proc.wait()
    finally:
        timer.cancel()
    seconds = time.perf_counter() - start
    status = "timed out" if timed_out else ("ok" if rc == 0 else "failed")
    return status, rc, seconds, "\n".join(tail)


def gpu_line() -> str | None:
    try:
        run = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return run.stdout.strip() or None if run.returncode == 0 else None


def git_commit() -> str | None:
    try:
        run = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return run.stdout.strip() or None


def run_all(out: Path, data: Path, smoke: bool, python: str = sys.executable, timeout_scale: float = 1.0) -> int:
    """Every step; writes ``out/gpu_check.json`` (after each step, so a kill leaves what was measured) and
    ``out/gpu_check.log``. Returns the exit code: 0 when every step succeeded, else 1."""
    out.mkdir(parents=True, exist_ok=True)
    steps = step_commands(smoke, data, out)
    record: dict = {"gpu_check": 1, "mode": "cpu-smoke" if smoke else "gpu",
                    "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
                    "nvidia_smi": None if smoke else gpu_line(), "budget_s": sum(b for b, _ in steps.values()),
                    "steps": {}, "ok": False}
    json_path = out / "gpu_check.json"
    with open(out / "gpu_check.log", "w", encoding="utf-8") as log:
        for name, (budget, args) in steps.items():
            budget *= timeout_scale
            shown = " ".join(["python", *args])
            print(f"+ [{name}, budget {budget:.0f} s] {shown}", flush=True)
            log.write(f"+ [{name}, budget {budget:.0f} s] {shown}\n")
            status, rc, seconds, tail = run_step(python, args, budget, log)
            entry = {"cmd": args, "budget_s": budget, "seconds": round(seconds, 1), "status": status, "rc": rc}
            result = _result(name, out, tail)
            if result is not None:
                entry["result"] = result
            elif status == "ok":
                entry["status"], entry["rc"] = "failed", rc
                tail += "\n(no result written)"
            if entry["status"] != "ok":
                entry["output_tail"] = tail
                message = (f"gpu_check: step {name} {entry['status']}"
                           f"{f' after {budget:.0f} s' if status == 'timed out' else f' (exit {rc})'}")
                print(message, file=sys.stderr, flush=True)
                log.write(message + "\n")
            if name == "env" and not smoke and result is not None and not result.get("cuda_available"):
                entry["status"] = "failed"
                entry["output_tail"] = f"torch {result.get('torch')} sees no CUDA device"
            record["steps"][name] = entry
            log.flush()
            _write_json(json_path, record)
            if name == "env" and entry["status"] != "ok":
                break  # without torch or CUDA nothing after this can run
        failed = [n for n, e in record["steps"].items() if e["status"] != "ok"]
        skipped = [n for n in steps if n not in record["steps"]]
        record["ok"] = not failed and not skipped
        record["seconds"] = round(sum(e["seconds"] for e in record["steps"].values()), 1)
        _write_json(json_path, record)
        if record["ok"]:
            summary = f"gpu_check: all {len(steps)} steps ok in {record['seconds']:.0f} s; {json_path}"
        else:
            failures = ", ".join(f"{n} ({record['steps'][n]['status']})" for n in failed)
            not_run = f"; not run: {', '.join(skipped)}" if skipped else ""
            summary = f"gpu_check: FAILED: {failures}{not_run}; see {out / 'gpu_check.log'}"
        log.write(summary + "\n")
    print(summary, file=sys.stdout if record["ok"] else sys.stderr, flush=True)
    return 0 if record["ok"] else 1


def _result(name: str, out: Path, tail: str):
    """The step's JSON result (its --json file; env: its printed line), or None."""
    if name == "env":
        for line in reversed(tail.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        return None
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


# -- the README tables ----------------------------------------------------------------------------------------------
def report(record: dict) -> str:
    """benchmarks/README.md's GPU-check tables from a ``gpu_check.json`` (also one cut short: what was measured)."""
    steps = record["steps"]
    seconds = record.get("seconds", sum(e["seconds"] for e in steps.values()))
    # a record cut short (the run killed from outside) lacks the steps it did not reach
    unrun = [name for name in STEPS if name not in steps] if not record["ok"] else []
    failed = [name for name, entry in steps.items() if entry["status"] != "ok"]
    lines = [f"`gpu_check.sh` ({record['mode']}), {record['started'][:10]}, commit {(record.get('commit') or '?')[:7]}"
             f", {record.get('nvidia_smi') or 'no GPU'}; torch {steps.get('env', {}).get('result', {}).get('torch')}"
             f"; {seconds:.0f} s of a {record['budget_s']} s budget"
             f"{'; FAILED: ' + ', '.join(failed) if failed else ''}{'; not run: ' + ', '.join(unrun) if unrun else ''}"
             ".", ""]
    step = steps.get("step", {}).get("result")
    if step:
        runs = step["runs"]
        lines += [f"PixelCLIP {step['model']} training step, batch {step['batch']}, {step['crop']}² crops from "
                  f"{step['image']} images ({step['masks_per_image']} masks), load in the step; median ms:", "",
                  "| part | " + " | ".join(r["precision"] for r in runs) + " |",
                  "|---|" + "---|" * len(runs)]
        for part in runs[0]["parts_ms"]:
            lines.append(f"| {part} | " + " | ".join(f"{r['parts_ms'][part]:,.1f}" for r in runs) + " |")
        lines.append("| **step** | " + " | ".join(f"**{r['step_ms']:,.1f}** ({r['images_per_s']} img/s)"
                                                 for r in runs) + " |")
        if step.get("max_memory_GiB"):
            lines.append("\nPeak GPU memory: " + ", ".join(f"{k} {v} GiB" for k, v in step["max_memory_GiB"].items()))
        lines.append("")
    wait = steps.get("data_wait", {}).get("result")
    if wait:
        lines += [f"Data wait, {wait['image']} images halved at read time (downscale {wait['downscale']}, the shipped "
                  f"config), batch {wait['batch']}; timed from an empty prefetch buffer:", "",
                  "| precision | workers | compute alone, samples/s | loader alone, samples/s (per worker) | "
                  "together, samples/s | GPU waits for data |", "|---|---|---|---|---|---|"]
        for r in wait["runs"]:
            lines.append(f"| {r['precision']} | {r['workers']} | {r['compute_samples_per_s']} | "
                         f"{r['loader_samples_per_s']} ({r['loader_samples_per_s_per_worker']}) | {r['samples_per_s']}"
                         f" | {100 * r['data_wait_share']:.1f}% of {r['timed_steps']} steps |")
        lines.append("")
    inference = steps.get("inference", {}).get("result")
    if inference:
        rows = [r for r in inference if "model" in r]
        lines += ["Evaluation (random weights, 375×500 images):", "", "| model | measure | value |", "|---|---|---|"]
        for r in rows:
            for key, value in r.items():
                if key not in ("model", "device"):
                    lines.append(f"| {r['model']} | {key} | {value:.3g} |" if isinstance(value, float)
                                 else f"| {r['model']} | {key} | {value} |")
        for r in inference:
            if "model" not in r:
                lines += [f"| – | {k} | {v} |" for k, v in r.items()]
        lines.append("")
    return "\n".join(lines)


# -- dependencies ---------------------------------------------------------------------------------------------------
def requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The requirement strings of pyproject.toml's ``dependencies``."""
    text = pyproject.read_text(encoding="utf-8")
    try:
        import tomllib

        return list(tomllib.loads(text)["project"]["dependencies"])
    except ImportError:  # Python 3.10: the list, read by hand
        block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
        return re.findall(r'"([^"]+)"', block)


#: distributions that install the same module as a required one (a machine's image may carry either)
ALTERNATIVES = {"opencv-python-headless": ("opencv-python", "opencv-contrib-python", "opencv-contrib-python-headless")}


def missing_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """Requirements of pyproject.toml not installed in this interpreter (by distribution name, or one of its
    :data:`ALTERNATIVES`)."""
    from importlib.metadata import PackageNotFoundError, version

    missing = []
    for requirement in requirements(pyproject):
        name = re.match(r"[A-Za-z0-9._-]+", requirement).group()
        for candidate in (name, *ALTERNATIVES.get(name, ())):
            try:
                version(candidate)
                break
            except PackageNotFoundError:
                continue
        else:
            missing.append(requirement)
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--out", default=os.environ.get("OUT") or "outputs/gpu_check")
    run.add_argument("--data", default=None, help="generated data (default: outputs/gpu_check_data[_smoke])")
    run.add_argument("--cpu-smoke", action="store_true")
    run.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every budget (tests)")
    rep = sub.add_parser("report")
    rep.add_argument("json")
    sub.add_parser("missing")
    args = parser.parse_args(argv)
    if args.command == "missing":
        print(" ".join(missing_requirements()))
        return 0
    if args.command == "report":
        print(report(json.loads(Path(args.json).read_text())))
        return 0
    data = Path(args.data or ROOT / f"outputs/gpu_check_data{'_smoke' if args.cpu_smoke else ''}").resolve()
    return run_all(Path(args.out).resolve(), data, args.cpu_smoke, timeout_scale=args.timeout_scale)


if __name__ == "__main__":
    sys.exit(main())
