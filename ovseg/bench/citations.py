"""Check a metafile's numbers against the documents they cite.

A table source names the table (a heading or caption line containing ``table``), the row (column
header -> cell text) and which column holds which reference; the first number in the cell must equal
the metafile's value (and the second its ± std). A quote source must occur verbatim in the document
(markdown ``**`` and line breaks ignored), and the numbers of the references it covers must appear in
the quote in that order.
"""

from __future__ import annotations

import re
from pathlib import Path

from ovseg.bench.metafile import Metafile, PaperValue, Source, reference_to_key

_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _norm(text: str) -> str:
    return " ".join(text.replace("**", "").split())


def _split_md_row(line: str) -> list[str]:
    cells = line.strip().strip("|").split("|")
    return [_norm(c) for c in cells]


def markdown_table_after(text: str, marker: str) -> list[dict[str, str]]:
    """Rows (header -> cell) of the first markdown table after the first line containing ``marker``."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if marker in line), None)
    if start is None:
        raise LookupError(f"no line containing {marker!r}")
    i = start + 1
    while i < len(lines) and not lines[i].lstrip().startswith("|"):
        i += 1
    if i >= len(lines):
        raise LookupError(f"no markdown table after {marker!r}")
    header = _split_md_row(lines[i])
    rows = []
    for line in lines[i + 1:]:
        if not line.lstrip().startswith("|"):
            break
        cells = _split_md_row(line)
        if all(re.fullmatch(r":?-+:?", c) for c in cells if c):
            continue
        rows.append(dict(zip(header, cells)))
    return rows


def tsv_table_before(text: str, marker: str) -> list[dict[str, str]]:
    """Rows of the tab-separated block just above the caption line containing ``marker`` (papers put
    captions under their tables)."""
    lines = text.splitlines()
    end = next((i for i, line in enumerate(lines) if marker in line), None)
    if end is None:
        raise LookupError(f"no line containing {marker!r}")
    i = end - 1
    while i >= 0 and "\t" not in lines[i]:
        i -= 1
    block = []
    while i >= 0 and "\t" in lines[i]:
        block.insert(0, lines[i])
        i -= 1
    if not block:
        raise LookupError(f"no tab-separated table above {marker!r}")
    header = [_norm(c) for c in block[0].split("\t")]
    return [dict(zip(header, (_norm(c) for c in line.split("\t")))) for line in block[1:]]


def _numbers(text: str) -> list[float]:
    return [float(x) for x in _NUMBER.findall(text)]


def _expected(value: PaperValue) -> list[float]:
    return [value.value] if value.std is None else [value.value, value.std]


def _is_subsequence(needle: list[float], hay: list[float]) -> bool:
    it = iter(hay)
    return all(any(abs(x - y) < 1e-9 for y in it) for x in needle)


def check_source(source: Source, values: dict[tuple[str, str], PaperValue], text: str) -> list[str]:
    """Problems (empty: every number this source covers is in the document as cited)."""
    problems = []
    if source.quote is not None:
        if _norm(source.quote) not in _norm(text):
            return [f"quote not found in {source.document}: {source.quote!r}"]
        expected = [x for ref in source.covers for x in _expected(values[reference_to_key(ref)])]
        if not _is_subsequence(expected, _numbers(source.quote)):
            problems.append(f"{source.document}: numbers {expected} of {list(source.covers)} not in order in the "
                            f"quote {source.quote!r}")
        return problems
    try:
        rows = (tsv_table_before if source.format == "tsv" else markdown_table_after)(text, source.table)
    except LookupError as err:
        return [f"{source.document}: {err}"]
    want = {k: _norm(v) for k, v in source.row.items()}
    matches = [r for r in rows if all(r.get(k) == v for k, v in want.items())]
    if len(matches) != 1:
        firsts = [next(iter(r.values()), "") for r in rows]
        return [f"{source.document} table {source.table!r}: {len(matches)} rows match {source.row} "
                f"(rows start with {firsts})"]
    row = matches[0]
    for ref, column in source.columns.items():
        value = values[reference_to_key(ref)]
        if column not in row:
            problems.append(f"{source.document} table {source.table!r}: no column {column!r} (columns {list(row)})")
            continue
        got = _numbers(row[column])
        if got[: len(_expected(value))] != _expected(value):
            problems.append(f"{ref} = {value} but {source.document} table {source.table!r} row {source.row} column "
                            f"{column!r} says {row[column]!r}")
    return problems


def check_metafile_sources(meta: Metafile, base: str | Path | None = None) -> list[str]:
    """Check every number of a metafile against its cited documents, resolved under ``base`` (default: the folder
    above the metafile's, i.e. ``benchmarks/``, whose ``sources/`` holds the cited tables). Returns problems, each
    naming the metafile and evaluation."""
    base = Path(base) if base is not None else Path(meta.path).resolve().parent.parent
    problems = []
    texts: dict[str, str] = {}
    for ev in meta.evaluations:
        values = {(d, m): v for d, m, v in ev.values()}
        for source in ev.sources:
            if source.document not in texts:
                path = base / source.document
                if not path.is_file():
                    problems.append(f"{meta.path} {ev.name}: cited document not found: {path}")
                    texts[source.document] = ""
                    continue
                texts[source.document] = path.read_text(encoding="utf-8")
            if not texts[source.document]:
                continue
            problems += [f"{meta.path} {ev.name}: {p}" for p in check_source(source, values, texts[source.document])]
    return problems
