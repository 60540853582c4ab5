"""``ovseg bench report``: ``RESULTS.md`` and ``results.csv`` from results files + metafiles.

Rows are metafile evaluations (a method variant under one protocol); each cell shows ours beside the
paper's number and the difference. A results file is matched to rows by its ``bench`` record (written
by ``ovseg bench run``), else by method + protocol (+ the metafile's ``weights.ovseg_ids``). Nothing
is dropped silently: files from another ovseg version, files missing a dataset the paper reports,
incomplete runs, unmatched or unreadable files all appear under *Notes* (and unmatched ones under
*Other results*). The output depends only on its inputs — sorted, no timestamps — so regenerating it
from the same files gives the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ovseg import __version__
from ovseg.bench.matrix import CELL_ROLE
from ovseg.bench.metafile import BASE_METRICS, Evaluation, Metafile, PaperValue

#: roles of results files that are pieces of another one (per dataset / per fold) or cells of a protocol matrix
#: (rendered as the matrix's tables): not rows of their own
PIECE_ROLES = ("part", "fold", CELL_ROLE)


def _dataset_order() -> list[str]:
    from ovseg.data.specs import BENCHMARKS

    return list(BENCHMARKS)


def _sort_datasets(names) -> list[str]:
    order = _dataset_order()
    return sorted(set(names), key=lambda n: (order.index(n) if n in order else len(order), n))


def _sort_metrics(names) -> list[str]:
    return sorted(set(names), key=lambda m: (BASE_METRICS.index(m) if m in BASE_METRICS else len(BASE_METRICS), m))


def _version_tuple(v: str):
    from packaging.version import InvalidVersion, Version

    try:
        return Version(v)
    except (InvalidVersion, TypeError):
        return None


@dataclass
class ResultsFile:
    label: str  # shown in the report: <root as given>/<path inside it>
    data: dict | None
    error: str | None = None

    @property
    def bench(self) -> dict:
        return (self.data or {}).get("bench") or {}

    @property
    def protocol(self) -> str | None:
        p = (self.data or {}).get("protocol")
        return p.get("name") if isinstance(p, dict) else p

    @property
    def version(self) -> str:
        return str((self.data or {}).get("ovseg_version"))

    @property
    def current_version(self) -> bool:
        return self.version == __version__

    @property
    def complete(self) -> bool:
        return self.bench.get("complete", True) is not False

    @property
    def is_fold_aggregate(self) -> bool:
        return any(isinstance(d, dict) and "folds" in d for d in ((self.data or {}).get("datasets") or {}).values())


def collect_results(roots: list[str | Path]) -> list[ResultsFile]:
    """Every ``results.json`` under the roots (a root may also be one file), pieces of a suite run
    (per-dataset and per-fold files) excepted. Sorted by label."""
    found: dict[str, ResultsFile] = {}
    for root in roots:
        root_str = str(root).rstrip("/") or "/"
        root = Path(root)
        if root.is_file():
            paths = [(root, root_str)]
        elif root.is_dir():
            paths = [(p, f"{root_str}/{p.relative_to(root).as_posix()}") for p in sorted(root.rglob("results.json"))]
        else:
            raise FileNotFoundError(f"results folder or file not found: {root}")
        for path, label in paths:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                found[label] = ResultsFile(label, None, f"unreadable: {type(err).__name__}: {err}")
                continue
            if not isinstance(data, dict) or not isinstance(data.get("datasets"), dict) or "method" not in data:
                found[label] = ResultsFile(label, None, "not an ovseg results file (no method/datasets)")
                continue
            if (data.get("bench") or {}).get("role") in PIECE_ROLES:
                continue
            found[label] = ResultsFile(label, data)
    return [found[k] for k in sorted(found)]


def _weights_match(meta: Metafile, weights: str) -> bool:
    ids = meta.weights.get("ovseg_ids")
    if not ids:
        return True
    if weights in ids:
        return True
    sha = meta.weights.get("sha256")
    m = re.search(r"#sha256:([0-9a-f]+)", weights or "")
    return bool(sha and m and sha.startswith(m.group(1)))


@dataclass
class Row:
    meta: Metafile
    ev: Evaluation
    results: ResultsFile | None = None
    others: list[ResultsFile] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.ev.id

    def ours(self, dataset: str, metric: str) -> tuple[float | None, float | None]:
        if self.results is None:
            return None, None
        entry = ((self.results.data or {}).get("datasets") or {}).get(dataset)
        if not isinstance(entry, dict):
            return None, None
        if metric.startswith("IoU/"):
            value = ((entry.get("per_class") or {}).get(metric[4:]) or {}).get("IoU")
            return (float(value) if _num(value) else None), None
        value, std = entry.get(metric), (entry.get("std") or {}).get(metric)
        return (float(value) if _num(value) else None), (float(std) if _num(std) else None)

    def missing(self) -> list[str]:
        if self.results is None:
            return []
        have = set(((self.results.data or {}).get("datasets") or {}))
        return [d for d in _sort_datasets(self.ev.datasets) if d not in have]


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class Report:
    """``parity``: protocol -> ``{references, passed}`` from ``parity.json`` (``ovseg.parity.report.protocol_parity``);
    each row shows whether its protocol has passed parity with the authors' code and at which commit."""

    def __init__(self, metafiles: dict[str, Metafile], results: list[ResultsFile],
                 parity: dict[str, dict[str, Any]] | None = None,
                 matrices: list[tuple[str, dict[str, Any]]] | None = None):
        """``matrices``: ``(label, record)`` of each protocol matrix found (:func:`ovseg.bench.matrix.read_matrix`)."""
        self.metafiles = metafiles
        self.matrices = matrices or []
        self.files = results
        self.parity = parity or {}
        self.rows: list[Row] = []
        for meta in sorted(metafiles.values(), key=lambda m: (m.method.lower(), m.name)):
            self.rows += [Row(meta, ev) for ev in meta.evaluations]
        self.by_id = {r.id: r for r in self.rows}
        self.notes: list[str] = []
        self.unmatched: list[ResultsFile] = []
        self._ambiguous: set[str] = set()
        self._match()

    # -- matching ----------------------------------------------------------------------------------
    def _candidates(self, rf: ResultsFile) -> list[Row]:
        ids = self.bench_ids(rf)
        if ids is not None:
            unknown = [i for i in ids if i not in self.by_id]
            if unknown:
                self.notes.append(f"`{rf.label}`: names evaluation(s) {', '.join(unknown)} that no metafile has")
            return [self.by_id[i] for i in ids if i in self.by_id]
        data = rf.data or {}
        rows = [r for r in self.rows if r.meta.method == data.get("method") and r.ev.protocol == rf.protocol
                and bool(r.ev.folds) == rf.is_fold_aggregate]
        rows = [r for r in rows if _weights_match(r.meta, str(data.get("weights")))]
        metas = sorted({r.meta.name for r in rows})
        if len(metas) > 1:  # e.g. one PixelCLIP checkpoint vs four PixelCLIP variants: never guess
            self.notes.append(f"`{rf.label}`: could be any of {', '.join(metas)} (method {data.get('method')}, "
                              f"protocol {rf.protocol}); run it through a suite entry "
                              "(`from: <metafile>/<evaluation>`) so its results say which — listed under Other results")
            self._ambiguous.add(rf.label)
            return []
        return rows

    @staticmethod
    def bench_ids(rf: ResultsFile) -> list[str] | None:
        ids = rf.bench.get("evaluations")
        return list(ids) if ids else None

    def _match(self) -> None:
        claims: dict[str, list[ResultsFile]] = {}
        for rf in self.files:
            if rf.data is None:
                self.notes.append(f"`{rf.label}`: {rf.error} — not used")
                continue
            rows = self._candidates(rf)
            if not rows:
                self.unmatched.append(rf)
                if rf.label in self._ambiguous:
                    continue
                self.notes.append(
                    f"`{rf.label}`: matches no metafile evaluation (method {rf.data.get('method')}, protocol "
                    f"{rf.protocol}, weights {rf.data.get('weights')}) — listed under Other results")
                continue
            if self.bench_ids(rf) is None:
                self.notes.append(f"`{rf.label}`: no suite record; matched by method and protocol to "
                                  f"{', '.join(r.id for r in rows)}")
            for r in rows:
                claims.setdefault(r.id, []).append(rf)
        for rid, files in claims.items():
            row = self.by_id[rid]
            files.sort(key=lambda f: (not f.complete, not f.current_version, len(row.ev.datasets)
                                      - len(set(row.ev.datasets) & set(f.data["datasets"])), f.label))
            row.results, row.others = files[0], files[1:]
            for other in row.others:
                self.notes.append(f"`{other.label}`: also matches {rid}; `{row.results.label}` is shown instead")
        for row in self.rows:
            rf = row.results
            if rf is None:
                continue
            if not rf.current_version:
                old, cur = _version_tuple(rf.version), _version_tuple(__version__)
                age = "an older" if old is not None and cur is not None and old < cur else "another"
                self.notes.append(f"`{rf.label}` ({row.id}): written by {age} ovseg ({rf.version}; this is "
                                  f"{__version__}) — shown and marked ⚠; rerun to refresh")
            for d in row.missing():
                self.notes.append(f"`{rf.label}` ({row.id}): no {d} in the results file, which the paper reports")
            if not rf.complete:
                done = ", ".join(rf.bench.get("folds_done") or []) or ", ".join(rf.data.get("datasets") or {})
                self.notes.append(f"`{rf.label}` ({row.id}): incomplete suite run (done: {done or 'nothing'}) — "
                                  f"`ovseg bench run` resumes it")
        self.notes = sorted(set(self.notes))

    # -- status ------------------------------------------------------------------------------------
    def status(self, row: Row) -> str:
        if row.results is None:
            return f"✗ not reproduced: {self.reason(row)}"
        parts = []
        missing = row.missing()
        if missing or not row.results.complete:
            parts.append("◐ partial" + (f" (missing {', '.join(missing)})" if missing else " (incomplete run)"))
        else:
            parts.append("✓ measured")
        if not row.results.current_version:
            parts.append(f"⚠ ovseg {row.results.version}")
        return " ".join(parts)

    def short_status(self, row: Row) -> str:
        """The status without its reason (the Rows table has the long form)."""
        if row.results is None:
            return "✗ not reproduced"
        mark = "◐ partial" if row.missing() or not row.results.complete else "✓ measured"
        return mark + ("" if row.results.current_version else f" ⚠ ovseg {row.results.version}")

    def parity_text(self, protocol: str) -> str:
        entry = self.parity.get(protocol)
        if entry is None:
            return "not checked"
        return ("✓ " if entry["passed"] else "✗ ") + ", ".join(entry["references"])

    def reason(self, row: Row) -> str:
        if row.ev.pending:
            return row.ev.pending
        root = row.meta.path.resolve().parents[2] if len(row.meta.path.resolve().parents) > 2 else Path.cwd()
        configs = [row.ev.config] if row.ev.config else [f.config for f in row.ev.folds if f.config]
        missing = [c for c in configs if not (root / c).is_file()]
        if not configs:
            return "no config yet"
        if missing:
            return f"config not written yet ({', '.join(missing)})"
        if not row.meta.weights_public:
            return "no public weights"
        return "not run yet"

    # -- formatting --------------------------------------------------------------------------------
    @staticmethod
    def fmt_paper(v: PaperValue | None) -> str:
        if v is None:
            return "—"
        def f(x: float) -> str:
            return f"{x:.1f}" if round(x, 1) == x else f"{x:.2f}"
        return f(v.value) if v.std is None else f"{f(v.value)}±{f(v.std)}"

    @staticmethod
    def fmt_ours(value: float | None, std: float | None) -> str:
        if value is None:
            return "—"
        return f"{value:.2f}" if std is None else f"{value:.2f}±{std:.2f}"

    @staticmethod
    def diff(value: float | None, paper: PaperValue | None) -> float | None:
        if value is None or paper is None:
            return None
        return round(value - paper.value, 2) + 0.0

    def cell(self, row: Row, dataset: str, metric: str) -> str:
        paper = row.ev.results.get(dataset, {}).get(metric)
        value, std = row.ours(dataset, metric)
        if paper is None and value is None:
            return ""
        text = f"{self.fmt_ours(value, std)} / {self.fmt_paper(paper)}"
        d = self.diff(value, paper)
        return text + (f" ({d:+.2f})" if d is not None else "")

    def weights_text(self, meta: Metafile) -> str:
        w = meta.weights
        name = w.get("name") or "weights"
        if not w.get("url"):
            return "not published"
        return f"[{name}]({w['url']})" + (" · sha256 published" if w.get("sha256") else "")

    def variant(self, row: Row) -> str:
        return f"{row.meta.variant} · {row.ev.backbone}" if row.ev.backbone else row.meta.variant

    # -- markdown ----------------------------------------------------------------------------------
    def markdown(self) -> str:
        n_files = len(self.files)
        out = [
            "# ovseg leaderboard",
            "",
            "<!-- generated by `ovseg bench report` from benchmarks/metafiles and results files; do not edit -->",
            "",
            f"{len(self.metafiles)} metafiles, {len(self.rows)} paper evaluations, {n_files} results "
            f"file{'s' if n_files != 1 else ''} read. Each cell is **ours / paper (ours − paper)** in percent; "
            "`—` means no number. ✓ measured: ovseg has a number for every dataset the paper reports; "
            "◐ partial: some are missing; ✗ not reproduced: no results yet, with the reason (no weights, no "
            "config, or not run). Numbers under different protocols are not comparable: each table is one "
            "protocol (`ovseg/eval/protocols/`).",
            "",
            "Reproduce: `ovseg bench run baselines --data-root /data/ovseg` (or `paper`), then `ovseg bench report`.",
            "",
            "*parity*: whether the row's protocol has passed `ovseg parity` against the authors' code "
            "(reference@commit; `PARITY.md` has the figures), or was not checked.",
            "",
            "## Rows",
            "",
            "| method | variant | evaluation | protocol | paper | weights | parity | status |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in self.rows:
            paper = row.meta.paper
            paper_text = f"[{paper.get('venue') or paper['title']}]({paper['url']})" if paper.get("url") else (
                paper.get("venue") or paper["title"])
            out.append(f"| {row.meta.method} | {self.variant(row)} | `{row.id}` | {row.ev.protocol} | {paper_text} | "
                       f"{self.weights_text(row.meta)} | {self.parity_text(row.ev.protocol)} | {self.status(row)} |")
        metrics = _sort_metrics(m for r in self.rows for _, m, _ in r.ev.values() if not m.startswith("IoU/"))
        for metric in metrics:
            protocols = sorted({r.ev.protocol for r in self.rows if any(m == metric for _, m, _ in r.ev.values())})
            out += ["", f"## {metric}"]
            for protocol in protocols:
                rows = [r for r in self.rows if r.ev.protocol == protocol
                        and any(m == metric for _, m, _ in r.ev.values())]
                datasets = set()
                for r in rows:
                    datasets |= {d for d, m, _ in r.ev.values() if m == metric}
                    if r.results is not None:
                        datasets |= {d for d in r.results.data["datasets"] if r.ours(d, metric)[0] is not None}
                cols = _sort_datasets(datasets)
                out += ["", f"### protocol `{protocol}`", "",
                        "| method | variant | evaluation | " + " | ".join(cols) + " | status |",
                        "|---|---|---|" + "---|" * len(cols) + "---|"]
                for r in rows:
                    cells = [self.cell(r, d, metric) for d in cols]
                    out.append(f"| {r.meta.method} | {self.variant(r)} | `{r.id}` | " + " | ".join(cells)
                               + f" | {self.short_status(r)} |")
        per_class_rows = [r for r in self.rows if any(m.startswith("IoU/") for _, m, _ in r.ev.values())]
        if per_class_rows:
            out += ["", "## Per-class IoU"]
            for r in per_class_rows:
                for dataset in _sort_datasets(d for d, m, _ in r.ev.values() if m.startswith("IoU/")):
                    out += ["", f"### {r.meta.method} {self.variant(r)} · `{r.id}` · {dataset}", "",
                            "| class | ours | paper | ours − paper |", "|---|---:|---:|---:|"]
                    for metric, paper in r.ev.results[dataset].items():
                        if not metric.startswith("IoU/"):
                            continue
                        value, _ = r.ours(dataset, metric)
                        d = self.diff(value, paper)
                        out.append(f"| {metric[4:]} | {self.fmt_ours(value, None)} | {self.fmt_paper(paper)} | "
                                   f"{'' if d is None else f'{d:+.2f}'} |")
        if self.unmatched:
            out += ["", "## Other results", "", "Results files that match no metafile evaluation (mIoU per dataset).",
                    "", "| results file | method | protocol | weights | ovseg | mIoU |", "|---|---|---|---|---|---|"]
            for rf in self.unmatched:
                ds = rf.data["datasets"]
                scores = ", ".join(f"{d} {self.fmt_ours(ds[d].get('mIoU') if isinstance(ds[d], dict) else None, None)}"
                                   for d in _sort_datasets(ds))
                out.append(f"| `{rf.label}` | {rf.data.get('method')} | {rf.protocol} | {rf.data.get('weights')} | "
                           f"{rf.version} | {scores} |")
        if self.matrices:
            from ovseg.bench.matrix import matrix_markdown

            out += ["", "## Protocol matrix", "", "Made by `ovseg bench matrix` (each folder's `MATRIX.md` holds the "
                    "same tables)."]
            for label, record in self.matrices:
                out += ["", f"### `{label}`", "", matrix_markdown(record, heading="####").rstrip("\n")]
        out += ["", "## Notes", ""]
        out += [f"- {n}" for n in self.notes] if self.notes else ["- none"]
        return "\n".join(out) + "\n"

    # -- csv ---------------------------------------------------------------------------------------
    CSV_COLUMNS = ("metafile", "evaluation", "method", "variant", "protocol", "dataset", "metric", "paper",
                   "paper_std", "ours", "ours_std", "diff", "status", "paper_weights", "our_weights",
                   "ovseg_version", "results_file")

    def csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.CSV_COLUMNS)

        def num(x: float | None, digits: int = 2) -> str:
            return "" if x is None else f"{x:.{digits}f}"

        for row in self.rows:
            keys = [(d, m) for d, m, _ in row.ev.values()]
            if row.results is not None:
                for d, entry in row.results.data["datasets"].items():
                    if isinstance(entry, dict):
                        keys += [(d, m) for m in BASE_METRICS if _num(entry.get(m))]
            seen = set()
            ordered = []
            for d in _sort_datasets(k[0] for k in keys):
                for m in _sort_metrics(k[1] for k in keys if k[0] == d and not k[1].startswith("IoU/")) + [
                        k[1] for k in keys if k[0] == d and k[1].startswith("IoU/")]:
                    if (d, m) not in seen:
                        seen.add((d, m))
                        ordered.append((d, m))
            rf = row.results
            for d, m in ordered:
                paper = row.ev.results.get(d, {}).get(m)
                value, std = row.ours(d, m)
                writer.writerow([
                    row.meta.name, row.ev.name, row.meta.method, self.variant(row), row.ev.protocol, d, m,
                    "" if paper is None else self.fmt_paper(PaperValue(paper.value)),
                    "" if paper is None or paper.std is None else self.fmt_paper(PaperValue(paper.std)),
                    num(value), num(std), num(self.diff(value, paper)), self.status(row),
                    row.meta.weights.get("url") or "", "" if rf is None else rf.data.get("weights"),
                    "" if rf is None else rf.version, "" if rf is None else rf.label,
                ])
        for rf in self.unmatched:
            for d in _sort_datasets(rf.data["datasets"]):
                entry = rf.data["datasets"][d]
                for m in BASE_METRICS:
                    value = entry.get(m) if isinstance(entry, dict) else None
                    if _num(value):
                        writer.writerow(["", "", rf.data.get("method"), "", rf.protocol, d, m, "", "", num(value), "",
                                         "", "unmatched", "", rf.data.get("weights"), rf.version, rf.label])
        return buf.getvalue()


def build_report(metafiles: dict[str, Metafile], roots: list[str | Path],
                 parity_dir: str | Path | None = None) -> Report:
    """``parity_dir``: the folder of ``parity.json`` (usually the report's own output folder)."""
    parity = None
    if parity_dir is not None:
        from ovseg.parity.report import protocol_parity

        parity = protocol_parity(parity_dir)
    return Report(metafiles, collect_results(roots), parity, collect_matrices(roots))


def collect_matrices(roots: list[str | Path]) -> list[tuple[str, dict[str, Any]]]:
    """Every protocol matrix (``matrix.json`` of ``ovseg bench matrix``) under the roots, with its cells' scores,
    labelled by its folder; sorted by label."""
    from ovseg.bench.matrix import MATRIX_FILE, read_matrix

    found = []
    for root in roots:
        root = Path(root)
        if root.is_dir():
            root_str = str(root).rstrip("/") or "/"
            for path in sorted(root.rglob(MATRIX_FILE)):
                folder = path.parent.relative_to(root).as_posix()
                found.append((root_str if folder == "." else f"{root_str}/{folder}", read_matrix(path)))
    return sorted(found, key=lambda item: item[0])


def write_report(report: Report, out_dir: str | Path) -> tuple[Path, Path]:
    from ovseg.utils.io import atomic_write_text

    out_dir = Path(out_dir)
    md, csv_path = out_dir / "RESULTS.md", out_dir / "results.csv"
    atomic_write_text(md, report.markdown())
    atomic_write_text(csv_path, report.csv())
    return md, csv_path
