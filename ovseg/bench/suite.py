"""Evaluation suites: ``benchmarks/suites/<suite>.yaml`` run with ``ovseg bench run <suite>`` (or
``ovseg test --config benchmarks/suites/<suite>.yaml``).

Schema::

    suite: paper                       # required: marks the YAML as a suite, and names it
    description: free text
    vars: {data_root: data}            # ${data_root} in override values; --var k=v / --data-root on the CLI
    output: outputs/bench/paper        # default results folder (one subfolder per entry); --out
    split_datasets: true               # one `ovseg test` per dataset: resume per dataset (default true)
    defaults: {data.init_args.root: ${data_root}}    # overrides for every entry
    entries:
      - from: maskclip_vitb16/sclip    # a metafile evaluation: its config, overrides and folds
        also: [maskclip_vitb16/context59_unknown]   # further evaluations the same run reproduces
        overrides: {...}               # on top of the metafile's
        fold_overrides: {fold0: {ckpt_path: ${weights_dir}/fold0.ckpt}}
      - name: maskclip_tiny            # or an explicit config (name required then)
        config: configs/tiny/maskclip.yaml      # one path or a list (merged in order)
        overrides: {data.init_args.datasets: [voc21, voc20]}
        folds: [{name: a, config: ..., overrides: {...}}]   # several runs reported as mean ± std

Output of entry ``E`` under the output folder::

    E/results.json, E/results.md    merged over datasets (and folds: mean ± std), with a "bench" record
                                    (suite, entry, evaluations, config_hash, complete)
    E/commands.txt                  the equivalent `ovseg test` command lines
    E/[<fold>/]parts/<dataset>/     one `ovseg test` run each: results.json (+ bench record), logs, pictures

Resuming: an entry whose ``results.json`` is complete and carries the entry's config hash is skipped;
otherwise each dataset whose part ``results.json`` carries the part's hash is reused and only the
others run. The hash covers the config files' contents, the overrides and extra arguments, minus
settings that do not change numbers (data root, workers, devices, logger, results folders).
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import re
import shlex
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from ovseg import __version__
from ovseg.bench.metafile import Metafile, default_metafile_dir, load_metafiles
from ovseg.eval.results import aggregate_folds, fold_markdown, version_sort_key
from ovseg.eval.session import EvaluationSettings
from ovseg.utils.cli_args import read_lightning_config
from ovseg.utils.io import atomic_write_json, atomic_write_text


class SuiteError(ValueError):
    """A suite file that cannot be run as written; the message names the file and the entry."""


#: settings (canonical dotted keys, ``init_args`` removed) that never change a number
NON_RESULT_KEYS = (
    "data.root", "data.num_workers", "data.eval_batch_size", "data.datasets",
    "trainer.logger", "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.devices",
    "trainer.strategy", "trainer.num_nodes", "trainer.default_root_dir", "trainer.callbacks",
    *(f"model.{name}" for name in EvaluationSettings.score_free()),
)
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ENTRY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# -- small helpers --------------------------------------------------------------------------------
def canonical_key(key: str) -> str:
    """``--model.init_args.clip.name`` -> ``model.clip.name`` (both spellings set the same thing)."""
    return re.sub(r"\.init_args(?=\.|$)", "", key.lstrip("-"))


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {canonical_key(prefix): data} if prefix else {}


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in NON_RESULT_KEYS)


def parse_cli_pairs(args: list[str]) -> list[tuple[str, Any]]:
    """``--a.b=1 --c x --flag`` -> ``[("a.b", 1), ("c", "x"), ("flag", True)]`` (values read as YAML)."""
    pairs = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise SuiteError(f"extra argument {arg!r}: expected --key value or --key=value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = arg[2:], args[i + 1]
            i += 1
        else:
            key, value = arg[2:], "true"
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        pairs.append((key, parsed))
        i += 1
    return pairs


def cli_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def dataset_name(entry: Any) -> str:
    return entry["name"] if isinstance(entry, dict) else str(entry)


def _substitute(value: Any, variables: dict[str, Any], where: str) -> Any:
    if isinstance(value, str):
        def repl(m: re.Match) -> str:
            if m.group(1) not in variables:
                raise SuiteError(f"{where}: unknown variable ${{{m.group(1)}}}; known: {sorted(variables)}")
            return str(variables[m.group(1)])

        whole = _VAR_RE.fullmatch(value)
        if whole:
            if whole.group(1) not in variables:
                raise SuiteError(f"{where}: unknown variable ${{{whole.group(1)}}}; known: {sorted(variables)}")
            return variables[whole.group(1)]
        return _VAR_RE.sub(repl, value)
    if isinstance(value, list):
        return [_substitute(v, variables, where) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, variables, where) for k, v in value.items()}
    return value


@functools.lru_cache(maxsize=None)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Content hash of a file (cached per path, size and mtime in this process); ``missing`` if there is none."""
    path = Path(path).expanduser()
    if not path.is_file():
        return "missing"
    stat = path.stat()
    return _file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def dataset_fingerprint(dataset: str, root: str, split: str) -> str:
    """:func:`ovseg.data.seg_dataset.split_fingerprint`, or ``unreadable`` (a result made from readable files is then
    not reused; the run itself reports the problem)."""
    from ovseg.data.seg_dataset import split_fingerprint
    from ovseg.data.specs import SPECS

    if dataset not in SPECS:
        return f"unknown dataset {dataset}"
    try:
        return split_fingerprint(dataset, root, split)
    except (OSError, ValueError):
        return "unreadable"


# -- the suite model ------------------------------------------------------------------------------
@dataclass
class Run:
    """One evaluation run (one checkpoint): config files + overrides + extra args, over its datasets."""

    fold: str | None
    configs: list[Path]
    overrides: dict[str, Any]
    extra_args: list[str]
    datasets: list[Any] = field(default_factory=list)

    def settings(self) -> dict[str, Any]:
        """Everything that can change a number, canonicalised (what the config hash covers)."""
        configs = []
        for path in self.configs:
            data = read_lightning_config(path)
            settings = {k: v for k, v in sorted(flatten(data).items()) if not _ignored(k)}
            if settings:  # a logger-only config (configs/logger/wandb.yaml) changes no number
                configs.append(settings)
        overrides = {canonical_key(k): v for k, v in self.overrides.items()}
        extra = [(canonical_key(k), v) for k, v in parse_cli_pairs(self.extra_args) if k != "config"]
        return {
            "configs": configs,
            "overrides": {k: v for k, v in sorted(overrides.items()) if not _ignored(k)},
            "extra": [(k, v) for k, v in extra if not _ignored(k)],
        }

    def pairs(self) -> list[tuple[str, Any]]:
        """``(canonical key, value)`` of every setting the run's command line gives, in its order: the configs
        (fragments expanded), then the overrides, then the extra arguments; later ones win, as in LightningCLI."""
        pairs = [item for path in self.configs for item in flatten(read_lightning_config(path)).items()]
        return pairs + [(canonical_key(k), v)
                        for k, v in list(self.overrides.items()) + parse_cli_pairs(self.extra_args)]

    def setting(self, key: str, default: Any = None) -> Any:
        """The value the run gets for ``key`` (canonical, e.g. ``data.root``)."""
        return dict(self.pairs()).get(key, default)

    def weights_fingerprint(self) -> dict[str, str]:
        """Content hashes of the checkpoint files a run reads (``ckpt_path``, a probe's ``checkpoint``): a file
        replaced at the same path is another model."""
        return {key: file_sha256(value) for key, value in self.pairs()  # later ones win
                if key.split(".")[-1] in ("ckpt_path", "checkpoint") and isinstance(value, str) and value}

    def data_fingerprint(self, dataset: Any) -> str:
        """The evaluated files of ``dataset`` under the run's data root (see
        :func:`ovseg.data.seg_dataset.split_fingerprint`); inline dataset entries are their own identity."""
        if not isinstance(dataset, str):
            return _sha(dataset)
        return dataset_fingerprint(dataset, str(self.setting("data.root", "data")), str(self.setting("data.split",
                                                                                                       "val")))

    def base_hash(self) -> str:
        """Everything a number depends on but the datasets: settings, checkpoint contents, ovseg version."""
        return _sha({"settings": self.settings(), "weights": self.weights_fingerprint(), "ovseg": __version__})

    def part_hash(self, dataset: Any) -> str:
        return _sha({"run": self.base_hash(), "dataset": dataset, "data": self.data_fingerprint(dataset)})

    def run_hash(self) -> str:
        return _sha({"run": self.base_hash(), "datasets": self.datasets,
                     "data": [self.data_fingerprint(d) for d in self.datasets]})

    def resolve_datasets(self) -> list[Any]:
        found = self.setting("data.datasets")
        if isinstance(found, str):
            found = yaml.safe_load(found)
        if found is None:
            found = ["voc21"]  # the DataModule's default
        if not isinstance(found, list) or not found:
            raise SuiteError(f"data.datasets must be a non-empty list, got {found!r}")
        return found

    def logger_disabled(self) -> bool:
        value = self.setting("trainer.logger", "unset")
        return value is None or value is False

    def cli_args(self, dataset_entries: list[Any], out_dir: Path) -> list[str]:
        args: list[str] = []
        for path in self.configs:
            args += ["--config", str(path)]
        # the datasets are the runner's (one part at a time): drop the entry's list from the command line
        args += [f"--{k}={cli_value(v)}" for k, v in self.overrides.items() if canonical_key(k) != "data.datasets"]
        args += list(self.extra_args)
        args += [f"--data.datasets={json.dumps(dataset_entries)}", f"--model.init_args.results_dir={out_dir}",
                 f"--trainer.default_root_dir={out_dir}"]
        if not self.logger_disabled():
            args.append(f"--trainer.logger.init_args.save_dir={out_dir}")
        return args

    def is_distributed(self) -> bool:
        settings = dict(self.pairs())
        strategy = str(settings.get("trainer.strategy") or "")
        devices = settings.get("trainer.devices", 1)
        # "auto" may mean all GPUs: DDP re-launches the command line, which must be `ovseg test`, not the suite
        nodes = settings.get("trainer.num_nodes", 1)
        return "ddp" in strategy or devices not in (1, "1", None) or nodes not in (1, "1", None)


@dataclass
class Entry:
    name: str
    evaluations: list[str]  # metafile/evaluation ids this entry reproduces
    runs: list[Run]
    not_runnable: str | None = None  # why it cannot run (pending weights/config), shown instead of running

    @property
    def has_folds(self) -> bool:
        return self.runs[0].fold is not None if self.runs else False

    def entry_hash(self) -> str:
        return _sha([r.run_hash() for r in self.runs])


@dataclass
class Suite:
    path: Path
    name: str
    description: str
    output: Path
    split_datasets: bool
    entries: list[Entry]


def _project_root(suite_path: Path) -> Path:
    if suite_path.parent.name == "suites" and suite_path.parent.parent.name == "benchmarks":
        return suite_path.parent.parent.parent
    return Path.cwd()


def resolve_suite_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"suite file not found: {path}")
        return path
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = base / "benchmarks" / "suites" / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"suite {name_or_path!r} not found: neither a file nor benchmarks/suites/{name_or_path}.yaml")


def load_suite(
    path: str | Path,
    variables: dict[str, Any] | None = None,
    extra_args: list[str] | None = None,
    metafiles: dict[str, Metafile] | None = None,
    extra_configs: list[str] | None = None,
) -> Suite:
    path = Path(path)
    where = str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SuiteError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict) or "suite" not in data:
        raise SuiteError(f"{path}: not a suite (no top-level 'suite:' key)")
    allowed = {"suite", "description", "vars", "output", "split_datasets", "defaults", "entries"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise SuiteError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    name = str(data["suite"])
    root = _project_root(path)
    variables = {**(data.get("vars") or {}), **(variables or {})}
    defaults = _substitute(dict(data.get("defaults") or {}), variables, f"{where}: defaults")
    extra_args = list(extra_args or [])
    extra_configs = [_resolve_config(c, root, where) for c in (extra_configs or [])]
    entries_raw = data.get("entries")
    if not isinstance(entries_raw, list) or not entries_raw:
        raise SuiteError(f"{path}: 'entries' must be a non-empty list")
    needs_meta = any(isinstance(e, dict) and "from" in e for e in entries_raw)
    if needs_meta and metafiles is None:
        meta_dir = path.parent.parent / "metafiles"
        metafiles = load_metafiles(meta_dir if meta_dir.is_dir() else default_metafile_dir())
    entries = [_parse_entry(e, i, where, root, variables, defaults, extra_args, extra_configs, metafiles or {})
               for i, e in enumerate(entries_raw)]
    names = [e.name for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SuiteError(f"{path}: duplicate entry names {dupes}")
    return Suite(path=path, name=name, description=str(data.get("description") or ""),
                 output=Path(data.get("output") or f"outputs/bench/{name}"),
                 split_datasets=bool(data.get("split_datasets", True)), entries=entries)


def _resolve_config(config: str, root: Path, where: str) -> Path:
    """Config paths are relative to the project root (the folder holding ``benchmarks/``), else to the
    current directory."""
    p = Path(config).expanduser()
    if p.is_absolute():
        return p
    if (root / p).exists() or not p.exists():
        return root / p
    return p.resolve()


def _parse_entry(raw: Any, index: int, where: str, root: Path, variables: dict, defaults: dict,
                 extra_args: list[str], extra_configs: list[Path], metafiles: dict[str, Metafile]) -> Entry:
    ew = f"{where}: entries[{index}]"
    if not isinstance(raw, dict):
        raise SuiteError(f"{ew}: expected a mapping")
    allowed = {"name", "from", "also", "config", "overrides", "folds", "fold_overrides"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise SuiteError(f"{ew}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    evaluations: list[str] = []
    config: Any = raw.get("config")
    overrides: dict[str, Any] = {}
    folds_raw: list[dict] = []
    pending: str | None = None
    if "from" in raw:
        ref = str(raw["from"])
        ev = _lookup_evaluation(ref, metafiles, ew)
        evaluations.append(ev.id)
        if config is None and not raw.get("folds"):
            config = ev.config
            folds_raw = [{"name": f.name, "config": f.config, "overrides": f.overrides} for f in ev.folds]
        overrides.update(ev.overrides)
        pending = ev.pending
        for other in raw.get("also") or []:
            evaluations.append(_lookup_evaluation(str(other), metafiles, ew).id)
    elif "also" in raw:
        raise SuiteError(f"{ew}: 'also' needs 'from'")
    name = str(raw.get("name") or (evaluations[0].replace("/", ".") if evaluations else ""))
    if not name:
        raise SuiteError(f"{ew}: give a name (or 'from: metafile/evaluation')")
    if not _ENTRY_NAME_RE.match(name):
        raise SuiteError(f"{ew}: entry name {name!r}: use letters, digits, '_', '-', '.' (it names a folder)")
    ew = f"{where}: entry {name!r}"
    overrides.update(raw.get("overrides") or {})
    if raw.get("folds"):
        folds_raw = list(raw["folds"])
    fold_overrides = raw.get("fold_overrides") or {}
    unknown_folds = sorted(set(fold_overrides) - {str(f.get("name")) for f in folds_raw})
    if unknown_folds:
        raise SuiteError(f"{ew}: fold_overrides for unknown folds {unknown_folds}")

    def make_run(fold: str | None, cfg: Any, over: dict) -> tuple[Run | None, str | None]:
        cfgs = cfg if isinstance(cfg, list) else [cfg]
        merged = _substitute({**defaults, **over}, variables, ew)  # typos fail even in entries that cannot run
        if any(c is None for c in cfgs):
            return None, pending or "no config for this evaluation yet"
        paths = [_resolve_config(str(c), root, ew) for c in cfgs] + extra_configs
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            return None, f"config not found: {', '.join(missing)}"
        for key, value in merged.items():  # Lightning's ckpt_path, or a method's own checkpoint setting
            if key.split(".")[-1] in ("ckpt_path", "checkpoint") and isinstance(value, str) and value:
                if not Path(value).expanduser().is_file():
                    return None, f"checkpoint not found: {value}"
        return Run(fold=fold, configs=paths, overrides=merged, extra_args=list(extra_args)), None

    runs: list[Run] = []
    reasons: list[str] = []
    if folds_raw:
        for f in folds_raw:
            fname = str(f.get("name"))
            over = {**overrides, **(f.get("overrides") or {}), **(fold_overrides.get(fname) or {})}
            run, why = make_run(fname, f.get("config"), over)
            if run is None:
                reasons.append(f"{fname}: {why}")
            else:
                runs.append(run)
    else:
        run, why = make_run(None, config, overrides)
        if run is None:
            reasons.append(why)
        else:
            runs.append(run)
    not_runnable = "; ".join(reasons) if reasons else None
    if not_runnable and pending and pending not in not_runnable:
        not_runnable += f" — {pending}"
    if not_runnable is None:
        for run in runs:
            run.datasets = run.resolve_datasets()
    return Entry(name=name, evaluations=evaluations, runs=runs if not_runnable is None else [],
                 not_runnable=not_runnable)


def _lookup_evaluation(ref: str, metafiles: dict[str, Metafile], where: str):
    if "/" not in ref:
        raise SuiteError(f"{where}: 'from: {ref}': expected <metafile>/<evaluation>")
    meta, ev = ref.split("/", 1)
    if meta not in metafiles:
        raise SuiteError(f"{where}: 'from: {ref}': no metafile {meta!r} (known: {sorted(metafiles)})")
    try:
        return metafiles[meta].evaluation(ev)
    except KeyError as err:
        raise SuiteError(f"{where}: 'from: {ref}': {err.args[0]}") from None


# -- results files: parts, merge, folds -----------------------------------------------------------
def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def merge_parts(parts: list[dict], datasets: list[Any]) -> dict:
    """Per-dataset results files of one run -> one results file (the results.json schema)."""
    first = parts[0]
    for p in parts[1:]:
        if p.get("method") != first.get("method"):
            raise ValueError(f"parts disagree on the method: {p.get('method')} vs {first.get('method')}")
        if (p.get("protocol") or {}).get("name") != (first.get("protocol") or {}).get("name"):
            raise ValueError("parts disagree on the protocol")
    weights = sorted({str(p.get("weights")) for p in parts})
    versions = sorted({str(p.get("ovseg_version")) for p in parts}, key=version_sort_key)
    config = json.loads(json.dumps(first.get("config") or {}))
    if isinstance(config.get("data"), dict):
        config["data"]["datasets"] = datasets
    merged_datasets: dict[str, Any] = {}
    by_name = {}
    for p in parts:
        by_name.update(p.get("datasets") or {})
    for d in datasets:
        name = dataset_name(d)
        if name in by_name:
            merged_datasets[name] = by_name[name]
    return {
        "method": first.get("method"),
        "weights": weights[0] if len(weights) == 1 else "; ".join(weights),
        "ovseg_version": versions[0],  # the oldest, so a mixed resume is reported as such
        "world_size": max(int(p.get("world_size") or 1) for p in parts),
        "config": config,
        "protocol": first.get("protocol"),
        "datasets": merged_datasets,
    }


# -- running ---------------------------------------------------------------------------------------
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
