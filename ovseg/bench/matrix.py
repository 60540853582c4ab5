"""The protocol matrix: every chosen method under every chosen protocol, on the same datasets, so that a user sees
how much of a published gain is protocol.

    ovseg bench matrix --methods sclip_vitb16/sclip configs/eval/naclip_vitb16.yaml \\
        --protocols sclip naclip clearclip --data-root /data/ovseg --out outputs/bench/matrix

A *method* is a config ``ovseg test`` runs (a path, or ``<metafile>/<evaluation>`` of ``benchmarks/metafiles``:
its config and overrides, and the paper numbers shown beside the row). A *cell* is that config with one thing
replaced, the protocol:

- a column sets ``model.init_args.protocol`` to its protocol and ``model.init_args.protocol_overrides`` to ``{}``:
  everything a protocol holds (:class:`~ovseg.eval.protocols.ProtocolSettings`: resize rule and library, whole or
  slide windows, templates, class-name files, logit scale, probability/area thresholds, background names, the
  reference pipeline's normalisation / padding / positional-embedding / activation settings, PAMR
  post-processing, mask classification) is the column's, including what the method's config had put in
  ``protocol_overrides`` (e.g. NACLIP's PAMR, a tiny config's small short side);
- the method keeps its class, its CLIP (model, weights, last-block attention, residual, FFN), its own arguments
  (e.g. MaskCLIP's ``ks_thresh``) and the settings it pins as its weights' own (``NATIVE_SETTINGS``);
- the method's *own* protocol is a column too (added when not asked for): there the cell is its config exactly,
  ``protocol_overrides`` included, i.e. its single ``ovseg test`` run on the matrix's datasets.

Every cell is an entry of an in-memory suite run by :class:`~ovseg.bench.suite_runner.SuiteRunner` into
``<out>/<method>/<protocol>/``: resumable and fresh-checked exactly as ``ovseg bench run`` (a finished cell whose
hash matches is skipped; a changed config, protocol file, weights, data or ovseg code reruns the cells it touches).
A protocol that cannot score a dataset (no class-name file for it, a class count that differs) leaves those cells
out, with the reason in the table; with ``own_names`` a protocol that only lacks a class-name list for the dataset (none
of its authors scored it: the toy world, a user's own set) scores it with the dataset's own names instead, its cells
marked † (``<out>/<method>/<protocol>-own-names/``). ``<out>/matrix.json`` records the plan (read by
``ovseg bench report``, which renders it into RESULTS.md) and ``<out>/MATRIX.md`` holds one table per dataset
(:func:`matrix_markdown`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ovseg.bench.metafile import Evaluation, Metafile
from ovseg.bench.parts import dataset_name, read_json
from ovseg.bench.suite import Entry, Run, Suite, SuiteError, build_suite
from ovseg.bench.suite_runner import SuiteRunner
from ovseg.eval.protocols import Protocol, load_protocol
from ovseg.utils.project import project_path

#: the setting a cell adds where its protocol has no class-name list for the dataset (``own_names``)
OWN_NAMES = {"class_names": "{dataset}"}
#: the role of a cell's results file: not a leaderboard row of its own (``ovseg bench report`` renders the matrix)
CELL_ROLE = "matrix_cell"
MATRIX_FILE = "matrix.json"
METRIC = "mIoU"


@dataclass
class MatrixMethod:
    """A row: a config (+ overrides) and, when it reproduces a metafile evaluation, that evaluation's numbers."""

    key: str  # the row's folder name
    configs: list[str]
    overrides: dict[str, Any]
    evaluation: Evaluation | None = None
    own_protocol: Protocol | None = None  # filled by :func:`plan_matrix`
    own_overrides: dict[str, Any] = field(default_factory=dict)
    method_class: str = ""


@dataclass
class Cell:
    method: str
    protocol: str
    own: bool
    datasets: list[Any]
    entry: str  # the suite entry's name
    own_names: bool = False  # scored with the datasets' own class names (:data:`OWN_NAMES`)

    @property
    def folder(self) -> str:
        """``<method>/<protocol>``, ``-own-names`` appended for a cell with the datasets' own names."""
        return f"{self.method}/{self.protocol}{'-own-names' if self.own_names else ''}"


@dataclass
class Matrix:
    out: Path
    methods: list[MatrixMethod]
    protocols: dict[str, Protocol]  # column key -> protocol, in column order
    datasets: list[Any]
    cells: dict[str, Cell]  # entry name -> cell
    cannot_score: dict[str, dict[str, str]]  # protocol key -> dataset -> why
    suite: Suite
    own_names: dict[str, dict[str, str]] = field(default_factory=dict)  # protocol key -> dataset -> missing list

    def record(self) -> dict[str, Any]:
        """``matrix.json``: what ``ovseg bench report`` needs to draw the tables from the cells' results files."""
        return {
            "matrix": 1,
            "datasets": [dataset_name(d) for d in self.datasets],
            "protocols": {k: {"name": p.name, "version": p.version, "source": _protocol_value(p),
                              "description": p.description} for k, p in self.protocols.items()},
            "methods": [{"key": m.key, "class": m.method_class, "configs": m.configs,
                         "evaluation": m.evaluation.id if m.evaluation else None,
                         "paper": _paper_numbers(m.evaluation),
                         "own_protocol": _protocol_key(m.own_protocol, self.protocols),
                         "own_overrides": m.own_overrides} for m in self.methods],
            "cells": [{"method": c.method, "protocol": c.protocol, "own": c.own, "own_names": c.own_names,
                       "datasets": [dataset_name(d) for d in c.datasets],
                       "results": f"{c.folder}/results.json"} for c in self.cells.values()],
            "cannot_score": self.cannot_score,
            "own_names": self.own_names,
        }


def _paper_numbers(ev: Evaluation | None) -> dict[str, float]:
    if ev is None:
        return {}
    return {d: m[METRIC].value for d, m in ev.results.items() if METRIC in m}


def _protocol_value(protocol: Protocol) -> str:
    """What ``model.init_args.protocol`` gets: a shipped protocol's name, else its file."""
    from ovseg.eval.protocols import PROTOCOLS_DIR

    source = Path(protocol.source).resolve()
    return source.stem if source.parent == PROTOCOLS_DIR.resolve() else str(source)


def _protocol_key(protocol: Protocol | None, columns: dict[str, Protocol]) -> str | None:
    for key, p in columns.items():
        if protocol is not None and Path(p.source).resolve() == Path(protocol.source).resolve():
            return key
    return None


# -- rows --------------------------------------------------------------------------------------------------------
def resolve_method(spec: str, metafiles: dict[str, Metafile]) -> MatrixMethod:
    """``configs/eval/x.yaml`` (a config file), ``<metafile>/<evaluation>``, or a metafile's name when it has one
    evaluation. A config is matched to the metafile evaluation that runs it as written (same config, no overrides),
    whose paper numbers go beside the row."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        config = path if path.is_file() else project_path(spec)
        if not config.is_file():
            raise SuiteError(f"--methods {spec}: config file not found")
        matches = [ev for m in metafiles.values() for ev in m.evaluations
                   if ev.config and not ev.overrides and not ev.folds
                   and project_path(ev.config).resolve() == config.resolve()]
        return MatrixMethod(key=config.stem, configs=[str(config.resolve())], overrides={},
                            evaluation=matches[0] if len(matches) == 1 else None)
    if "/" in spec:
        meta, name = spec.split("/", 1)
        if meta not in metafiles:
            raise SuiteError(f"--methods {spec}: no metafile {meta!r} (known: {', '.join(sorted(metafiles))})")
        try:
            ev = metafiles[meta].evaluation(name)
        except KeyError as err:
            raise SuiteError(f"--methods {spec}: {err.args[0]}") from None
    elif spec in metafiles:
        evaluations = [e for e in metafiles[spec].evaluations if e.config]
        if len(evaluations) != 1:
            raise SuiteError(f"--methods {spec}: metafile {spec!r} has {len(evaluations)} runnable evaluations; "
                             f"name one: {', '.join(e.id for e in evaluations)}")
        ev = evaluations[0]
    else:
        raise SuiteError(f"--methods {spec}: neither a config file, <metafile>/<evaluation> nor a metafile name")
    if ev.folds or not ev.config:
        raise SuiteError(f"--methods {spec}: {ev.id} is " + ("a k-fold evaluation (one run per fold): the matrix "
                         "scores one model per row" if ev.folds else f"not runnable ({ev.pending or 'no config'})"))
    return MatrixMethod(key=ev.id.replace("/", "."), configs=[str(project_path(ev.config))],
                        overrides=dict(ev.overrides), evaluation=ev)


def _own_protocol(run: Run) -> tuple[Protocol, dict[str, Any], str]:
    """The protocol a method's run evaluates under (its config's, else its class's default), the config's
    ``protocol_overrides`` and the class path."""
    import importlib

    class_path = str(run.setting("model.class_path") or "")
    name = run.setting("model.protocol")
    if not name:
        module, _, cls = class_path.rpartition(".")
        name = getattr(importlib.import_module(module), cls).default_protocol
    return load_protocol(str(name)), dict(run.setting("model.protocol_overrides") or {}), class_path


def cannot_score(protocol: Protocol, dataset: Any, overrides: dict[str, Any] | None = None) -> str | None:
    """Why ``protocol`` (with ``overrides``) cannot score ``dataset`` (its class-name file is missing or has another
    class count), or None. The check is the evaluator's own (:func:`~ovseg.eval.evaluator.dataset_vocabulary`)."""
    from ovseg.data.specs import SPECS
    from ovseg.eval.evaluator import dataset_vocabulary

    if not isinstance(dataset, str) or dataset not in SPECS:  # a dict entry brings its own names
        return None
    spec = SPECS[dataset]
    try:
        dataset_vocabulary(protocol.settings_for(dataset, overrides), dataset, spec.class_names, spec.background_index)
    except (OSError, ValueError) as err:
        return str(err).split(":")[0] if isinstance(err, FileNotFoundError) else str(err)
    return None


# -- the plan ----------------------------------------------------------------------------------------------------
def plan_matrix(methods: list[str], protocols: list[str], out: str | Path, data_root: str | None = None,
                datasets: list[Any] | None = None, metafiles: dict[str, Metafile] | None = None,
                extra_args: list[str] | None = None, extra_configs: list[str] | None = None,
                own_names: bool = False) -> Matrix:
    """The cells of ``methods`` x ``protocols`` (plus each method's own protocol) on ``datasets`` (default: those
    every method's config scores), as a suite of one entry per cell (two where ``own_names`` scores some datasets
    with their own class names: those the protocol has no list for, which the names alone kept it from scoring)."""
    from ovseg.bench.metafile import load_metafiles

    if not methods:
        raise SuiteError("--methods: name at least one method")
    metafiles = load_metafiles() if metafiles is None else metafiles
    rows = [resolve_method(spec, metafiles) for spec in methods]
    keys = [m.key for m in rows]
    if len(set(keys)) != len(keys):
        twice = sorted({k for k in keys if keys.count(k) > 1})
        raise SuiteError(f"--methods: the same method twice ({', '.join(twice)})")
    own_datasets = []
    for m in rows:
        run = Run(fold=None, configs=[Path(c) for c in m.configs], overrides=m.overrides, extra_args=[])
        try:
            m.own_protocol, m.own_overrides, m.method_class = _own_protocol(run)
            own_datasets.append(run.resolve_datasets())
        except ValueError as err:
            raise SuiteError(f"--methods {m.key} ({', '.join(m.configs)}): {err}") from err
    if datasets is None:  # those every row's config scores, in the first one's order
        datasets = [d for d in own_datasets[0] if all(d in o for o in own_datasets[1:])]
        if not datasets:
            raise SuiteError("the methods' configs score no dataset in common: give --datasets")
    columns: dict[str, Protocol] = {}
    for p in [load_protocol(s) for s in protocols] + [m.own_protocol for m in rows]:
        if _protocol_key(p, columns) is not None:
            continue
        if p.name in columns:
            raise SuiteError(f"--protocols: two protocols named {p.name!r} ({columns[p.name].source}, {p.source})")
        columns[p.name] = p
    unscorable = {k: {dataset_name(d): why for d in datasets if (why := cannot_score(p, d))}
                  for k, p in columns.items()}
    renamed: dict[str, dict[str, str]] = {}
    if own_names:
        for k, per in unscorable.items():
            for d in datasets:
                if dataset_name(d) in per and cannot_score(columns[k], d, OWN_NAMES) is None:
                    renamed.setdefault(k, {})[dataset_name(d)] = per.pop(dataset_name(d))
    unscorable = {k: v for k, v in unscorable.items() if v}
    entries, cells = [], {}
    for m in rows:
        own_key = _protocol_key(m.own_protocol, columns)
        for key, protocol in columns.items():
            scored = [d for d in datasets if dataset_name(d) not in unscorable.get(key, {})]
            with_own_names = [d for d in scored if key != own_key and dataset_name(d) in renamed.get(key, {})]
            for group, names in ((([d for d in scored if d not in with_own_names]), False), (with_own_names, True)):
                if not group:
                    continue
                overrides = {**m.overrides, "data.init_args.datasets": group}
                if data_root is not None:
                    overrides["data.init_args.root"] = data_root
                if key != own_key:
                    overrides.update({"model.init_args.protocol": _protocol_value(protocol),
                                      "model.init_args.protocol_overrides": dict(OWN_NAMES) if names else {}})
                name = f"{m.key}--{key}" + ("--own-names" if names else "")
                entries.append({"name": name, "config": m.configs, "overrides": overrides})
                cells[name] = Cell(m.key, key, key == own_key, group, name, own_names=names)
    out = Path(out)
    suite = build_suite({"suite": "matrix", "output": str(out), "entries": entries}, out / MATRIX_FILE,
                        extra_args=extra_args, metafiles=metafiles, extra_configs=extra_configs)
    for entry in suite.entries:
        if entry.not_runnable:
            raise SuiteError(f"cell {entry.name}: {entry.not_runnable}")
    return Matrix(out, rows, columns, list(datasets), cells, unscorable, suite, renamed)


class MatrixRunner(SuiteRunner):
    """The suite runner with one folder per cell, ``<out>/<method>/<protocol>/``, and cell records that keep the
    cells out of the leaderboard's rows."""

    def __init__(self, matrix: Matrix, **kwargs: Any):
        super().__init__(matrix.suite, out=matrix.out, **kwargs)
        self.matrix = matrix

    def entry_dir(self, entry: Entry) -> Path:
        return self.out / self.matrix.cells[entry.name].folder

    def _bench_record(self, entry: Entry, role: str, config_hash: str, complete: bool, run: Run | None) -> dict:
        record = super()._bench_record(entry, CELL_ROLE if role == "entry" else role, config_hash, complete, run)
        cell = self.matrix.cells[entry.name]
        return {**record, "matrix": {"method": cell.method, "protocol": cell.protocol, "own": cell.own}}


def run_matrix(matrix: Matrix, **runner_args: Any) -> tuple[list, Path]:
    """Run (or resume) every cell, then write ``matrix.json`` and ``MATRIX.md``; returns the outcomes and MATRIX.md."""
    from ovseg.utils.io import atomic_write_json, atomic_write_text

    outcomes = MatrixRunner(matrix, **runner_args).run()
    atomic_write_json(matrix.out / MATRIX_FILE, matrix.record())
    md = matrix.out / "MATRIX.md"
    atomic_write_text(md, "# Protocol matrix\n\n" + matrix_markdown(read_matrix(matrix.out / MATRIX_FILE)))
    return outcomes, md


# -- tables ------------------------------------------------------------------------------------------------------
def read_matrix(path: str | Path) -> dict[str, Any]:
    """A ``matrix.json`` with each cell's scores read from its results file (``mIoU`` per dataset; ``complete``
    false for a cell still to run or resume)."""
    path = Path(path)
    record = read_json(path)
    if not isinstance(record, dict) or record.get("matrix") != 1 or "cells" not in record:
        raise ValueError(f"{path}: not a matrix record of `ovseg bench matrix`")
    for cell in record["cells"]:
        results = read_json(path.parent / cell["results"]) or {}
        bench = results.get("bench") or {}
        cell["scores"] = {d: (e or {}).get(METRIC) for d, e in (results.get("datasets") or {}).items()}
        cell["complete"] = bool(results) and bench.get("complete") is True
    return record


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def matrix_markdown(record: dict[str, Any], heading: str = "##") -> str:
    """One table per dataset: rows methods, columns protocols, mIoU. The method's own protocol is marked ★ (its
    config as written: its single ``ovseg test``); other cells add their difference to it; *paper* is the metafile's
    number for the row's evaluation."""
    columns = list(record["protocols"])
    cells = {(c["method"], c["protocol"], d): c for c in record["cells"] for d in c["datasets"]}
    own_names = record.get("own_names") or {}
    lines = [
        "Each cell is a method's config scored under one protocol (mIoU, %): the column replaces the protocol and "
        "every `protocol_overrides` of the config (resize, windows, templates, class names, logit scale, "
        "thresholds, reference-pipeline settings, PAMR); the method keeps its model, weights and own arguments. "
        "★ marks the method's own protocol (its config exactly, as `ovseg test` runs it); other cells show the "
        "difference to it. *paper*: the number its metafile cites. ◐: not finished (`ovseg bench matrix` "
        "resumes it); n/a: the protocol cannot score the dataset (reason below); †: the protocol has no class-name "
        "list for the dataset, scored with the dataset's own names.",
        "",
        "Protocols: " + "; ".join(f"`{k}` v{p['version']} ({p['description']})" for k, p in record["protocols"].items())
        + ".",
    ]
    for dataset in record["datasets"]:
        lines += ["", f"{heading} {dataset}", "",
                  "| method | own protocol | paper | " + " | ".join(f"`{c}`" for c in columns) + " |",
                  "|---|---|---:|" + "---:|" * len(columns)]
        for m in record["methods"]:
            own = cells.get((m["key"], m["own_protocol"], dataset))
            own_value = (own or {}).get("scores", {}).get(dataset)
            row = []
            for column in columns:
                cell = cells.get((m["key"], column, dataset))
                if dataset in record["cannot_score"].get(column, {}):
                    row.append("n/a")
                    continue
                value = (cell or {}).get("scores", {}).get(dataset)
                text = _fmt(value)
                if cell is not None and cell["own"]:
                    text = f"**{text}** ★"
                elif value is not None and own_value is not None:
                    text += f" ({value - own_value:+.2f})"
                if cell is not None and cell.get("own_names"):
                    text += " †"
                if cell is None or not cell["complete"]:
                    text += " ◐"
                row.append(text)
            extra = f" + {json.dumps(m['own_overrides'], sort_keys=True)}" if m["own_overrides"] else ""
            name = f"{m['key']}" + (f" · `{m['evaluation']}`" if m["evaluation"] else "")
            paper = m["paper"].get(dataset)
            lines.append(f"| {name} | `{m['own_protocol']}`{extra} | {'—' if paper is None else f'{paper:g}'} | "
                         + " | ".join(row) + " |")
    reasons = [f"- `{p}` cannot score {d}: {why}" for p, per in record["cannot_score"].items()
               for d, why in per.items()]
    reasons += [f"- † `{p}` has no class-name list for {d} ({why}): its cells read the dataset's own names"
                for p, per in own_names.items() for d, why in per.items()]
    if reasons:
        lines += ["", *reasons]
    return "\n".join(lines) + "\n"
