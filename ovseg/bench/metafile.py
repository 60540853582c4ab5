"""Paper metafiles: ``benchmarks/metafiles/<name>.yaml``, one per method variant.

In the spirit of mmsegmentation's ``metafile.yaml``: what a paper reports, under which protocol, with
which weights and hardware, and — unlike mmseg — where each number was read (``sources``), so a test
can check every number against the document it cites. Schema (version 1)::

    schema: 1
    name: pixelclip_vitb16_sa1b          # = the file's stem; unique
    method: PixelCLIP                    # ovseg method class, as in results.json "method"
    variant: ViT-B/16 · SA-1B masks      # what distinguishes this file from the method's others
    paper: {title, venue, authors, url, code}          # title required; others may be null
    model: {backbone, training, hardware}              # backbone required; hardware: what the paper used
    weights: {name, url, sha256, format, ovseg_ids, source}   # all may be null: null url = not published
    notes: free text (optional)
    evaluations:                         # one per protocol/setting the paper reports numbers under
      - name: paper                      # unique in the file; rows are "<name>/<evaluation>"
        protocol: pixelclip              # ovseg protocol name (or a descriptive id, e.g. knn)
        config: configs/eval/x.yaml      # what `ovseg test` runs (null: none yet; say why in `pending`)
        overrides: {dotted.key: value}   # CLI overrides on top of the config
        folds: [{name, config, overrides}]   # instead of config: one run per fold, reported as mean ± std
        backbone: RN50                   # optional: when it differs from model.backbone
        pending: why it cannot be run yet (optional)
        notes: free text (optional)
        results:                         # the paper's numbers, percent, exactly as printed
          voc20: {mIoU: 85.9}
          context59: {pAcc: {value: 54.4, std: 1.0}}
          voc21: {per_class_IoU: {background: 92.4, aeroplane: 83.5}}
        sources:                         # every number above is covered by one source
          - {document: sources/x.md, table: <heading>, row: {column: cell}, columns: {voc20.mIoU: VOC 20}}
          - {document: sources/y.md, quote: "verbatim text", covers: [context59.pAcc, context59.mAcc]}

A number's *reference* is ``<dataset>.<metric>`` or ``<dataset>.per_class_IoU.<class>``; internally a
per-class value is the metric ``IoU/<class>`` (the results files' ``per_class.<class>.IoU``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

SCHEMA_VERSION = 1
BASE_METRICS = ("mIoU", "pAcc", "mAcc")
PER_CLASS = "per_class_IoU"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_METRIC_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class MetafileError(ValueError):
    """A metafile (or suite) that does not follow the schema; the message names the file and the field."""


@dataclass(frozen=True)
class PaperValue:
    value: float
    std: float | None = None

    def __str__(self) -> str:
        return f"{self.value:g}" if self.std is None else f"{self.value:g}±{self.std:g}"


@dataclass(frozen=True)
class Fold:
    name: str
    config: str | None
    overrides: dict[str, Any]


@dataclass(frozen=True)
class Source:
    document: str
    table: str | None = None
    row: dict[str, str] | None = None
    columns: dict[str, str] | None = None  # reference -> column header
    format: str = "markdown"  # markdown | tsv
    quote: str | None = None
    covers: tuple[str, ...] = ()

    @property
    def references(self) -> list[str]:
        return list(self.columns) if self.columns else list(self.covers)


@dataclass
class Evaluation:
    metafile: str  # the metafile's name
    name: str
    protocol: str
    config: str | None
    overrides: dict[str, Any]
    folds: list[Fold]
    results: dict[str, dict[str, PaperValue]]  # dataset -> metric ("mIoU", "IoU/<class>") -> value
    sources: list[Source]
    backbone: str | None = None
    pending: str | None = None
    notes: str | None = None
    description: str | None = None

    @property
    def id(self) -> str:
        return f"{self.metafile}/{self.name}"

    @property
    def datasets(self) -> list[str]:
        return list(self.results)

    def values(self) -> Iterator[tuple[str, str, PaperValue]]:
        for dataset, metrics in self.results.items():
            for metric, value in metrics.items():
                yield dataset, metric, value


@dataclass
class Metafile:
    path: Path
    name: str
    method: str
    variant: str
    paper: dict[str, Any]
    model: dict[str, Any]
    weights: dict[str, Any]
    evaluations: list[Evaluation]
    notes: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def evaluation(self, name: str) -> Evaluation:
        for e in self.evaluations:
            if e.name == name:
                return e
        raise KeyError(f"metafile {self.name!r} has no evaluation {name!r}; it has "
                       f"{[e.name for e in self.evaluations]}")

    @property
    def weights_public(self) -> bool:
        return bool(self.weights.get("url"))


def reference_to_key(ref: str) -> tuple[str, str]:
    """``voc21.per_class_IoU.dining table`` -> ``("voc21", "IoU/dining table")``;
    ``voc20.mIoU`` -> ``("voc20", "mIoU")``."""
    parts = ref.split(".", 2)
    if len(parts) == 3 and parts[1] == PER_CLASS:
        return parts[0], f"IoU/{parts[2]}"
    if len(parts) == 2:
        return parts[0], parts[1]
    raise ValueError(f"bad reference {ref!r}: expected <dataset>.<metric> or <dataset>.{PER_CLASS}.<class>")


# -- validation ------------------------------------------------------------------------------------
class _Checker:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, message: str) -> None:
        raise MetafileError(f"{self.path}: {where}: {message}" if where else f"{self.path}: {message}")

    def mapping(self, value: Any, where: str, required: tuple[str, ...] = (), optional: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, dict):
            self.fail(where, f"expected a mapping, got {type(value).__name__}")
        missing = [k for k in required if k not in value]
        if missing:
            self.fail(where, f"missing required key(s) {missing}")
        if required or optional:
            unknown = sorted(str(k) for k in value if k not in required + optional)
            if unknown:
                self.fail(where, f"unknown key(s) {unknown}; allowed: {sorted(required + optional)}")
        return value

    def string(self, value: Any, where: str, nullable: bool = False) -> str | None:
        if value is None and nullable:
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(where, f"expected a non-empty string{' or null' if nullable else ''}, got {value!r}")
        return value

    def number(self, value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            self.fail(where, f"expected a number, got {value!r}")
        if not 0 <= value <= 100:
            self.fail(where, f"expected a percentage in [0, 100], got {value!r}")
        return float(value)

    def paper_value(self, value: Any, where: str) -> PaperValue:
        if isinstance(value, dict):
            self.mapping(value, where, required=("value",), optional=("std",))
            std = value.get("std")
            return PaperValue(self.number(value["value"], f"{where}.value"),
                              None if std is None else self.number(std, f"{where}.std"))
        return PaperValue(self.number(value, where))

    def overrides(self, value: Any, where: str) -> dict[str, Any]:
        if value is None:
            return {}
        value = self.mapping(value, where)
        for key in value:
            if not isinstance(key, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_.]*$", key):
                self.fail(where, f"override keys are dotted setting names like model.init_args.protocol, got {key!r}")
        return dict(value)


def _dataset_classes(dataset: str) -> list[str] | None:
    from ovseg.data.classnames import display_names, read_class_names

    try:
        return display_names(read_class_names(dataset))
    except FileNotFoundError:
        return None


def _known_datasets() -> tuple[str, ...]:
    from ovseg.data.specs import BENCHMARKS

    return BENCHMARKS


def parse_metafile(data: Any, path: Path) -> Metafile:
    c = _Checker(path)
    top = c.mapping(data, "", required=("schema", "name", "method", "variant", "paper", "model", "weights",
                                        "evaluations"), optional=("notes",))
    if top["schema"] != SCHEMA_VERSION:
        c.fail("schema", f"unsupported schema version {top['schema']!r} (this ovseg reads {SCHEMA_VERSION})")
    name = c.string(top["name"], "name")
    if name != path.stem:
        c.fail("name", f"must equal the file name {path.stem!r}, got {name!r}")
    if not _NAME_RE.match(name):
        c.fail("name", f"use letters, digits, '_', '-', '.': {name!r}")
    method = c.string(top["method"], "method")
    variant = c.string(top["variant"], "variant")
    paper = c.mapping(top["paper"], "paper", required=("title",), optional=("venue", "authors", "url", "code"))
    c.string(paper["title"], "paper.title")
    for key in ("venue", "authors", "url", "code"):
        c.string(paper.get(key), f"paper.{key}", nullable=True)
    model = c.mapping(top["model"], "model", required=("backbone",), optional=("training", "hardware"))
    c.string(model["backbone"], "model.backbone")
    for key in ("training", "hardware"):
        c.string(model.get(key), f"model.{key}", nullable=True)
    weights = c.mapping(top["weights"], "weights",
                        optional=("name", "url", "sha256", "format", "ovseg_ids", "source", "notes"))
    for key in ("name", "url", "format", "source", "notes"):
        c.string(weights.get(key), f"weights.{key}", nullable=True)
    sha = weights.get("sha256")
    if sha is not None and not (isinstance(sha, str) and _SHA256_RE.match(sha)):
        c.fail("weights.sha256", f"expected 64 lowercase hex digits or null, got {sha!r}")
    if sha is not None and not weights.get("url"):
        c.fail("weights.sha256", "a sha256 without a url: give the address it was published for")
    ids = weights.get("ovseg_ids")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) and i for i in ids)):
        c.fail("weights.ovseg_ids", f"expected a list of strings, got {ids!r}")
    notes = c.string(top.get("notes"), "notes", nullable=True)

    evals_raw = top["evaluations"]
    if not isinstance(evals_raw, list) or not evals_raw:
        c.fail("evaluations", "expected a non-empty list")
    evaluations: list[Evaluation] = []
    for i, raw in enumerate(evals_raw):
        evaluations.append(_parse_evaluation(c, raw, f"evaluations[{i}]", name))
    names = [e.name for e in evaluations]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        c.fail("evaluations", f"duplicate evaluation names {dupes}")
    return Metafile(path=path, name=name, method=method, variant=variant, paper=dict(paper), model=dict(model),
                    weights=dict(weights), evaluations=evaluations, notes=notes, raw=top)


def _parse_evaluation(c: _Checker, raw: Any, where: str, metafile: str) -> Evaluation:
    e = c.mapping(raw, where, required=("name", "protocol", "results", "sources"),
                  optional=("config", "overrides", "folds", "backbone", "pending", "notes", "description"))
    name = c.string(e["name"], f"{where}.name")
    if not _NAME_RE.match(name):
        c.fail(f"{where}.name", f"use letters, digits, '_', '-', '.': {name!r}")
    where = f"{where} ({name})"
    protocol = c.string(e["protocol"], f"{where}.protocol")
    config = c.string(e.get("config"), f"{where}.config", nullable=True)
    overrides = c.overrides(e.get("overrides"), f"{where}.overrides")
    folds: list[Fold] = []
    if e.get("folds") is not None:
        if config is not None:
            c.fail(where, "give either config or folds, not both")
        if not isinstance(e["folds"], list) or len(e["folds"]) < 2:
            c.fail(f"{where}.folds", "expected a list of at least 2 folds")
        for j, f in enumerate(e["folds"]):
            fw = f"{where}.folds[{j}]"
            f = c.mapping(f, fw, required=("name", "config"), optional=("overrides",))
            fname = c.string(f["name"], f"{fw}.name")
            if not _NAME_RE.match(fname):
                c.fail(f"{fw}.name", f"use letters, digits, '_', '-', '.': {fname!r}")
            folds.append(Fold(fname, c.string(f["config"], f"{fw}.config", nullable=True),
                              c.overrides(f.get("overrides"), f"{fw}.overrides")))
        fnames = [f.name for f in folds]
        if len(set(fnames)) != len(fnames):
            c.fail(f"{where}.folds", f"duplicate fold names {fnames}")
    for key in ("backbone", "pending", "notes", "description"):
        c.string(e.get(key), f"{where}.{key}", nullable=True)

    results: dict[str, dict[str, PaperValue]] = {}
    res = c.mapping(e["results"], f"{where}.results")
    if not res:
        c.fail(f"{where}.results", "no numbers")
    known = _known_datasets()
    for dataset, metrics in res.items():
        dw = f"{where}.results.{dataset}"
        if dataset not in known:
            c.fail(dw, f"unknown dataset {dataset!r}; use one of {list(known)}")
        metrics = c.mapping(metrics, dw)
        if not metrics:
            c.fail(dw, "no numbers")
        out: dict[str, PaperValue] = {}
        for metric, value in metrics.items():
            mw = f"{dw}.{metric}"
            if metric == PER_CLASS:
                classes = _dataset_classes(dataset)
                per_class = c.mapping(value, mw)
                for cls, v in per_class.items():
                    if classes is not None and cls not in classes:
                        c.fail(f"{mw}.{cls}", f"unknown class {cls!r} of {dataset}; its classes: {classes}")
                    out[f"IoU/{cls}"] = c.paper_value(v, f"{mw}.{cls}")
            elif not isinstance(metric, str) or not _METRIC_RE.match(metric):
                c.fail(mw, f"metric names are identifiers (mIoU, pAcc, mAcc, {PER_CLASS}, ...), got {metric!r}")
            else:
                out[metric] = c.paper_value(value, mw)
        results[dataset] = out

    sources: list[Source] = []
    if not isinstance(e["sources"], list) or not e["sources"]:
        c.fail(f"{where}.sources", "expected a non-empty list: every number cites where it was read")
    covered: set[tuple[str, str]] = set()
    for j, s in enumerate(e["sources"]):
        sw = f"{where}.sources[{j}]"
        s = c.mapping(s, sw, required=("document",), optional=("table", "row", "columns", "format", "quote", "covers"))
        document = c.string(s["document"], f"{sw}.document")
        if s.get("quote") is not None:
            if any(s.get(k) is not None for k in ("table", "row", "columns")):
                c.fail(sw, "a source is either a quote (quote + covers) or a table (table + row + columns)")
            quote = c.string(s["quote"], f"{sw}.quote")
            covers = s.get("covers")
            if not isinstance(covers, list) or not covers:
                c.fail(f"{sw}.covers", "list the references (dataset.metric) whose numbers the quote holds, in order")
            source = Source(document=document, quote=quote, covers=tuple(str(x) for x in covers))
        else:
            table = c.string(s.get("table"), f"{sw}.table")
            row = c.mapping(s.get("row"), f"{sw}.row")
            columns = c.mapping(s.get("columns"), f"{sw}.columns")
            fmt = s.get("format", "markdown")
            if fmt not in ("markdown", "tsv"):
                c.fail(f"{sw}.format", f"expected markdown or tsv, got {fmt!r}")
            source = Source(document=document, table=table, row={str(k): str(v) for k, v in row.items()},
                            columns={str(k): str(v) for k, v in columns.items()}, format=fmt)
        for ref in source.references:
            try:
                key = reference_to_key(ref)
            except ValueError as err:
                c.fail(sw, str(err))
            if key[0] not in results or key[1] not in results[key[0]]:
                c.fail(sw, f"cites {ref!r}, which is not in this evaluation's results")
            covered.add(key)
        sources.append(source)
    uncovered = [f"{d}.{m}" for d, m, _ in _iter_values(results) if (d, m) not in covered]
    if uncovered:
        c.fail(f"{where}.sources", f"numbers without a source: {uncovered}")
    return Evaluation(metafile=metafile, name=name, protocol=protocol, config=config, overrides=overrides,
                      folds=folds, results=results, sources=sources, backbone=e.get("backbone"),
                      pending=e.get("pending"), notes=e.get("notes"), description=e.get("description"))


def _iter_values(results: dict[str, dict[str, PaperValue]]) -> Iterator[tuple[str, str, PaperValue]]:
    for d, metrics in results.items():
        for m, v in metrics.items():
            yield d, m, v


def load_metafile(path: str | Path) -> Metafile:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise MetafileError(f"{path}: not valid YAML: {err}") from err
    return parse_metafile(data, path)


def default_metafile_dir() -> Path:
    """``benchmarks/metafiles`` of the project (:func:`ovseg.utils.project.project_path`)."""
    from ovseg.utils.project import project_path

    return project_path("benchmarks/metafiles")


def load_metafiles(directory: str | Path | None = None) -> dict[str, Metafile]:
    """Every ``*.yaml`` in the folder, by name (sorted). Raises :class:`MetafileError` on the first bad file."""
    directory = Path(directory) if directory is not None else default_metafile_dir()
    if not directory.is_dir():
        raise FileNotFoundError(f"metafile folder not found: {directory}")
    out: dict[str, Metafile] = {}
    for path in sorted(directory.glob("*.yaml")):
        meta = load_metafile(path)
        out[meta.name] = meta
    return out
