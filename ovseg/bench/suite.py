"""Evaluation suites: ``benchmarks/suites/<suite>.yaml``, loaded here into entries and runs, run with
``ovseg bench run <suite>`` (:mod:`ovseg.bench.suite_runner`).

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
settings that do not change numbers (data root, workers, devices, logger, results folders), the contents of every
file a setting names (checkpoints, weights, protocol YAMLs, class names), the evaluated data files (dict entries'
local files too) and ovseg's source tree (:mod:`ovseg.bench.fingerprint`). What a run gets for a setting (its
datasets, data root, devices, …) is what ``ovseg test`` parses from the same command line: LightningCLI's parser
reads it (:meth:`Run.setting`).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ovseg import __version__
from ovseg.bench.fingerprint import (changes_no_score, code_fingerprint, dataset_fingerprint, named_files_fingerprint,
                                     parse_cli_pairs, sha)
from ovseg.bench.metafile import Metafile, default_metafile_dir, load_metafiles
from ovseg.utils.cli_args import canonical_key, flatten, read_lightning_config
from ovseg.utils.project import project_path


class SuiteError(ValueError):
    """A suite file that cannot be run as written; the message names the file and the entry."""

_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ENTRY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def cli_value(value: Any) -> str:
    """A setting's value as a command-line word (YAML/JSON, as LightningCLI reads it)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


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
        """Everything written down that can change a number, canonicalised (what the config hash covers)."""
        configs = []
        for path in self.configs:
            data = read_lightning_config(path)
            settings = {k: v for k, v in sorted(flatten(data).items()) if not changes_no_score(k)}
            if settings:  # a logger-only config (configs/logger/wandb.yaml) changes no number
                configs.append(settings)
        overrides = {canonical_key(k): v for k, v in self.overrides.items()}
        extra = [(canonical_key(k), v) for k, v in parse_cli_pairs(self.extra_args) if k != "config"]
        return {
            "configs": configs,
            "overrides": {k: v for k, v in sorted(overrides.items()) if not changes_no_score(k)},
            "extra": [(k, v) for k, v in extra if not changes_no_score(k)],
        }

    def command_line(self, left_out: tuple[str, ...] = ()) -> list[str]:
        """The run's own ``ovseg test`` arguments: its configs, then the overrides (but the ``left_out`` settings,
        canonical keys), then the extra arguments."""
        args = [a for path in self.configs for a in ("--config", str(path))]
        args += [f"--{k}={cli_value(v)}" for k, v in self.overrides.items() if canonical_key(k) not in left_out]
        return args + list(self.extra_args)

    @functools.cached_property
    def config(self) -> dict[str, Any]:
        """Every setting the run gets, defaults included, as ``ovseg test`` parses its command line."""
        from ovseg.runner import parse_command

        return parse_command("test", self.command_line())

    def setting(self, key: str) -> Any:
        """The value the run gets for ``key`` (canonical, e.g. ``data.root``: ``init_args`` left out)."""
        value: Any = self.config
        for part in key.split("."):
            if isinstance(value, dict) and part not in value:
                value = value.get("init_args")
            value = value.get(part) if isinstance(value, dict) else None
        return value

    def files_fingerprint(self) -> dict[str, str]:
        """Content hashes of the files the run's settings name (``ckpt_path``, a probe's ``checkpoint``,
        ``clip.pretrained``, a protocol YAML, …; see :func:`~ovseg.bench.fingerprint.named_files_fingerprint`)."""
        return named_files_fingerprint(flatten(self.config))

    def data_fingerprint(self, dataset: Any) -> str:
        """The evaluated files of ``dataset`` under the run's data root (a named dataset's split, a dict entry's
        local files: see :func:`~ovseg.bench.fingerprint.dataset_fingerprint`); other entries are their own identity."""
        if not isinstance(dataset, (str, dict)):
            return sha(dataset)
        return dataset_fingerprint(dataset, str(self.setting("data.root")), str(self.setting("data.split")))

    def base_hash(self) -> str:
        """Everything a number depends on but the datasets: settings, the files they name, ovseg's code."""
        return sha({"settings": self.settings(), "files": self.files_fingerprint(), "ovseg": __version__,
                    "code": code_fingerprint()})

    def part_hash(self, dataset: Any) -> str:
        return sha({"run": self.base_hash(), "dataset": dataset, "data": self.data_fingerprint(dataset)})

    def run_hash(self) -> str:
        return sha({"run": self.base_hash(), "datasets": self.datasets,
                    "data": [self.data_fingerprint(d) for d in self.datasets]})

    def resolve_datasets(self) -> list[Any]:
        from ovseg.data.datamodule import DEFAULT_DATASETS

        found = self.setting("data.datasets")
        found = list(DEFAULT_DATASETS) if found is None else found
        if not isinstance(found, list) or not found:
            raise SuiteError(f"data.datasets must be a non-empty list, got {found!r}")
        return found

    def logger_disabled(self) -> bool:
        value = self.setting("trainer.logger")
        return value is None or value is False

    def cli_args(self, dataset_entries: list[Any], out_dir: Path) -> list[str]:
        """The command line of the part of the run scoring ``dataset_entries`` into ``out_dir``."""
        # the datasets are the runner's (one part at a time): drop the entry's list from the command line
        args = self.command_line(left_out=("data.datasets",))
        args += [f"--data.datasets={json.dumps(dataset_entries)}", f"--model.init_args.results_dir={out_dir}",
                 f"--trainer.default_root_dir={out_dir}"]
        if not self.logger_disabled():
            args.append(f"--trainer.logger.init_args.save_dir={out_dir}")
        return args

    def is_distributed(self) -> bool:
        """Whether the run starts more than one process: DDP re-launches the command line, which must then be
        `ovseg test`, not the suite."""
        devices, nodes = self.setting("trainer.devices"), self.setting("trainer.num_nodes")
        if devices == "auto":  # Lightning's default: every GPU there is
            import torch

            devices = torch.cuda.device_count() if self.setting("trainer.accelerator") in ("auto", "gpu", "cuda") else 1
        return "ddp" in str(self.setting("trainer.strategy") or "") or devices not in (1, "1") or nodes not in (1, "1")


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
        return sha([r.run_hash() for r in self.runs])


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
    candidate = project_path(f"benchmarks/suites/{name_or_path}.yaml")
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
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SuiteError(f"{path}: not valid YAML: {err}") from err
    return build_suite(data, path, variables, extra_args, metafiles, extra_configs)


def build_suite(
    data: Any,
    path: Path,
    variables: dict[str, Any] | None = None,
    extra_args: list[str] | None = None,
    metafiles: dict[str, Metafile] | None = None,
    extra_configs: list[str] | None = None,
) -> Suite:
    """A suite from its YAML content ``data``; ``path`` names it in errors and anchors its config paths (a suite
    made in memory, as ``ovseg bench matrix`` does, gives the file it stands for)."""
    where = str(path)
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
    for run in runs if not_runnable is None else []:
        try:
            run.config  # noqa: B018  (parsed once, here: a line LightningCLI refuses cannot run)
        except ValueError as err:
            not_runnable = f"{run.fold + ': ' if run.fold else ''}ovseg test refuses its settings: {err}"
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
