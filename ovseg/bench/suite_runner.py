"""Running a loaded suite: each entry's parts (one ``ovseg test`` per dataset, or per run), resumed where results
with the same hash exist, merged into the entry's ``results.json`` (folds: mean ± std)."""

from __future__ import annotations

import fnmatch
import shlex
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ovseg.bench.parts import dataset_name, merge_parts, read_json
from ovseg.bench.suite import Entry, Run, Suite, SuiteError
from ovseg.eval.results import aggregate_folds, fold_markdown
from ovseg.utils.io import atomic_write_json, atomic_write_text


RunFn = Callable[[list[str], bool], None]


def run_ovseg_test(args: list[str], isolate: bool) -> None:
    """One ``ovseg test`` run of a suite part: in this process (default), or a subprocess (``isolate``; DDP)."""
    from ovseg.runner import run_trainer

    run_trainer("test", args, isolate)


def _expected_images(dataset: Any, split: str = "val") -> int | None:
    if not isinstance(dataset, str):
        return None
    from ovseg.data.specs import SPECS

    spec = SPECS.get(dataset)
    return spec.expected_counts.get(split) if spec is not None else None


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@dataclass
class EntryOutcome:
    name: str
    status: str  # done | skipped | failed | not runnable
    results: Path | None = None
    detail: str = ""


class SuiteRunner:
    def __init__(self, suite: Suite, out: str | Path | None = None, force: bool = False, isolate: bool = False,
                 only: list[str] | None = None, fail_fast: bool = False, run_fn: RunFn | None = None,
                 log: Callable[[str], None] | None = None):
        self.suite = suite
        self.out = Path(out) if out is not None else suite.output
        self.force = force
        self.isolate = isolate
        self.only = only or []
        self.fail_fast = fail_fast
        self._run_fn = run_fn
        self.log = log or (lambda msg: print(msg, flush=True))

    def selected(self) -> list[Entry]:
        if not self.only:
            return list(self.suite.entries)
        chosen = [e for e in self.suite.entries if any(fnmatch.fnmatchcase(e.name, p) for p in self.only)]
        if not chosen:
            raise SuiteError(f"--only {self.only}: no entry of suite {self.suite.name!r} matches "
                             f"({[e.name for e in self.suite.entries]})")
        return chosen

    def run_fn(self, args: list[str], isolate: bool) -> None:
        (self._run_fn or run_ovseg_test)(args, isolate)

    # -- state -------------------------------------------------------------------------------------
    def entry_dir(self, entry: Entry) -> Path:
        return self.out / entry.name

    def run_dir(self, entry: Entry, run: Run) -> Path:
        return self.entry_dir(entry) / run.fold if run.fold else self.entry_dir(entry)

    def part_dir(self, entry: Entry, run: Run, dataset: Any) -> Path:
        name = dataset_name(dataset) if self.suite.split_datasets else "all"
        return self.run_dir(entry, run) / "parts" / name

    def groups(self, run: Run) -> list[list[Any]]:
        return [[d] for d in run.datasets] if self.suite.split_datasets else [list(run.datasets)]

    def _group_hash(self, run: Run, group: list[Any]) -> str:
        return run.part_hash(group[0]) if self.suite.split_datasets else run.run_hash()

    def part_done(self, entry: Entry, run: Run, group: list[Any]) -> bool:
        if self.force:
            return False
        res = read_json(self.part_dir(entry, run, group[0]) / "results.json")
        return bool(res) and (res.get("bench") or {}).get("config_hash") == self._group_hash(run, group) and all(
            dataset_name(d) in (res.get("datasets") or {}) for d in group)

    def entry_done(self, entry: Entry) -> bool:
        if self.force:
            return False
        res = read_json(self.entry_dir(entry) / "results.json")
        bench = (res or {}).get("bench") or {}
        return bench.get("config_hash") == entry.entry_hash() and bench.get("complete") is True

    def status(self, entry: Entry) -> str:
        if entry.not_runnable:
            return "not runnable"
        if self.entry_done(entry):
            return "done"
        done = sum(self.part_done(entry, r, g) for r in entry.runs for g in self.groups(r))
        total = sum(len(self.groups(r)) for r in entry.runs)
        return f"{done}/{total} parts done" if done else "to run"

    def commands(self, entry: Entry) -> list[str]:
        return ["ovseg test " + shlex.join(r.cli_args(g, self.part_dir(entry, r, g[0])))
                for r in entry.runs for g in self.groups(r)]

    # -- running -----------------------------------------------------------------------------------
    def run(self) -> list[EntryOutcome]:
        entries = self.selected()
        outcomes = []
        started = time.perf_counter()
        self.log(f"bench: suite {self.suite.name!r} ({len(entries)} entries) -> {self.out}")
        for i, entry in enumerate(entries, 1):
            tag = f"[{i}/{len(entries)} {entry.name}]"
            outcome = self._run_entry(entry, tag)
            outcomes.append(outcome)
            if outcome.status == "failed" and self.fail_fast:
                break
        self.log(f"bench: suite {self.suite.name!r} finished in {_fmt_seconds(time.perf_counter() - started)}")
        for o in outcomes:
            self.log(f"  {o.status:>12}  {o.name}" + (f"  {o.results}" if o.results else "")
                     + (f"  ({o.detail})" if o.detail else ""))
        return outcomes

    def _run_entry(self, entry: Entry, tag: str) -> EntryOutcome:
        if entry.not_runnable:
            self.log(f"bench: {tag} not runnable: {entry.not_runnable}")
            return EntryOutcome(entry.name, "not runnable", detail=entry.not_runnable)
        entry_dir = self.entry_dir(entry)
        if self.entry_done(entry):
            self.log(f"bench: {tag} up to date ({entry_dir / 'results.json'}, config {entry.entry_hash()[:12]}) "
                     f"— skipped")
            return EntryOutcome(entry.name, "skipped", entry_dir / "results.json")
        previous = read_json(entry_dir / "results.json")
        if previous is not None and ((previous.get("bench") or {}).get("config_hash") != entry.entry_hash()
                                     or self.force):
            # results of another configuration of this entry: never leave them looking current
            for stale in ("results.json", "results.md"):
                (entry_dir / stale).unlink(missing_ok=True)
        atomic_write_text(entry_dir / "commands.txt", "\n".join(self.commands(entry)) + "\n")
        errors = []
        fold_results: dict[str, dict] = {}
        for run in entry.runs:
            parts, run_errors = self._run_parts(entry, run, tag)
            errors += run_errors
            if parts:
                merged = merge_parts(parts, run.datasets)
                complete = not run_errors and len(merged["datasets"]) == len(run.datasets)
                if run.fold:
                    merged["bench"] = self._bench_record(entry, "fold", run.run_hash(), complete, run)
                    self._write(self.run_dir(entry, run), merged)
                    if complete:
                        fold_results[run.fold] = merged
                else:
                    merged["bench"] = self._bench_record(entry, "entry", entry.entry_hash(), complete, run)
                    self._write(entry_dir, merged)
        if entry.has_folds and fold_results:
            aggregate = aggregate_folds(fold_results)
            complete = len(fold_results) == len(entry.runs) and not errors
            aggregate["bench"] = self._bench_record(entry, "entry", entry.entry_hash(), complete, None)
            aggregate["bench"]["folds"] = [r.fold for r in entry.runs]
            aggregate["bench"]["folds_done"] = sorted(fold_results)
            atomic_write_json(entry_dir / "results.json", aggregate)
            atomic_write_text(entry_dir / "results.md", fold_markdown(aggregate))
        if errors:
            atomic_write_text(entry_dir / "error.txt", "\n\n".join(errors) + "\n")
            self.log(f"bench: {tag} FAILED ({len(errors)} error(s), see {entry_dir / 'error.txt'})")
            return EntryOutcome(entry.name, "failed", None, errors[0].splitlines()[0])
        (entry_dir / "error.txt").unlink(missing_ok=True)
        return EntryOutcome(entry.name, "done", entry_dir / "results.json")

    def _bench_record(self, entry: Entry, role: str, config_hash: str, complete: bool, run: Run | None) -> dict:
        record = {"suite": self.suite.name, "entry": entry.name, "evaluations": list(entry.evaluations),
                  "role": role, "config_hash": config_hash, "complete": complete}
        if run is not None:
            record["datasets"] = [dataset_name(d) for d in run.datasets]
            if run.fold:
                record["fold"] = run.fold
        return record

    def _write(self, directory: Path, results: dict) -> None:
        from ovseg.eval.results import write_results

        write_results(directory, results)

    def _run_parts(self, entry: Entry, run: Run, tag: str) -> tuple[list[dict], list[str]]:
        parts, errors = [], []
        groups = self.groups(run)
        rates: list[float] = []
        fold = f" {run.fold}" if run.fold else ""
        isolate = self.isolate or run.is_distributed()
        for k, group in enumerate(groups):
            label = ",".join(dataset_name(d) for d in group)
            part_dir = self.part_dir(entry, run, group[0])
            if self.part_done(entry, run, group):
                self.log(f"bench: {tag}{fold} {label}: done earlier — reused ({part_dir / 'results.json'})")
                parts.append(read_json(part_dir / "results.json"))
                continue
            self.log(f"bench: {tag}{fold} {label} ({k + 1}/{len(groups)}): running")
            t0 = time.perf_counter()
            try:
                (part_dir / "results.json").unlink(missing_ok=True)
                self.run_fn(run.cli_args(group, part_dir), isolate)
                res = read_json(part_dir / "results.json")
                if res is None:
                    raise RuntimeError(f"ovseg test wrote no results.json into {part_dir}")
            except KeyboardInterrupt:
                raise
            except Exception as err:  # noqa: BLE001 — one failing dataset must not stop the suite
                msg = f"{entry.name}{fold} {label}: {type(err).__name__}: {err}"
                errors.append(msg + "\n" + traceback.format_exc())
                self.log(f"bench: {tag}{fold} {label}: FAILED: {type(err).__name__}: {err}")
                if self.fail_fast:
                    break
                continue
            seconds = time.perf_counter() - t0
            images = sum(int((res["datasets"].get(dataset_name(d)) or {}).get("num_images") or 0) for d in group)
            rate = images / seconds if seconds > 0 else 0.0
            if rate > 0:
                rates.append(rate)
            res["bench"] = {**self._bench_record(entry, "part", self._group_hash(run, group), True, None),
                            "datasets": [dataset_name(d) for d in group], **({"fold": run.fold} if run.fold else {})}
            atomic_write_json(part_dir / "results.json", res)
            parts.append(res)
            scores = ", ".join(f"{dataset_name(d)} mIoU {(res['datasets'].get(dataset_name(d)) or {}).get('mIoU')}"
                               for d in group)
            left = [d for g in groups[k + 1:] for d in g]
            eta = ""
            if left:
                counts = [_expected_images(d) for d in left]
                if rates and all(c is not None for c in counts):
                    eta = f" · {len(left)} dataset(s) left in this run, ≈ {_fmt_seconds(sum(counts) / rates[-1])}"
                else:
                    eta = f" · {len(left)} dataset(s) left in this run"
            self.log(f"bench: {tag}{fold} {label}: {images} images in {seconds:.1f}s ({rate:.2f} images/s, model "
                     f"load included) · {scores}{eta}")
        return parts, errors
