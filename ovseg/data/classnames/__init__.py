"""Class-name files: one line per class, comma-separated synonyms (SCLIP's format).

``read_class_names("voc21")`` reads the file shipped here; ``read_class_names("sclip/voc21")`` the
protocol-specific variant; any other argument is a path to a user's file. An inline list such as
``"cat,dog,sky"`` is handled by :func:`parse_class_list`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

CLASSNAMES_DIR = Path(__file__).parent


def resolve_class_file(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".txt" and path.is_file():
        return path
    shipped = CLASSNAMES_DIR / f"{name_or_path}.txt"
    if shipped.is_file():
        return shipped
    if path.is_file():
        return path
    known = sorted(str(p.relative_to(CLASSNAMES_DIR).with_suffix("")) for p in CLASSNAMES_DIR.rglob("*.txt"))
    raise FileNotFoundError(
        f"class-name file {str(name_or_path)!r} not found: neither a file nor a shipped name ({', '.join(known)})"
    )


@lru_cache(maxsize=None)
def _read(path: Path) -> tuple[tuple[str, ...], ...]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not part of a name
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    classes = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        synonyms = tuple(s.strip() for s in line.split(",") if s.strip())
        if not synonyms:
            raise ValueError(f"{path}:{lineno}: a class line holds no name: {line!r}")
        classes.append(synonyms)
    if not classes:
        raise ValueError(f"{path}: class-name file is empty")
    return tuple(classes)


def read_class_names(name_or_path: str | Path) -> list[list[str]]:
    """Synonym lists, one per class, from a shipped name or a file path."""
    return [list(s) for s in _read(resolve_class_file(name_or_path).resolve())]


def display_names(class_names: Sequence[Sequence[str]]) -> list[str]:
    """One name per class for tables and results: its first synonym or, where another class starts with the same
    one (ADE-847's three ``bag`` classes, as CAT-Seg's ade847.json lists them), its whole synonym line."""
    firsts = Counter(synonyms[0] for synonyms in class_names)
    return [synonyms[0] if firsts[synonyms[0]] == 1 else ", ".join(synonyms) for synonyms in class_names]


def looks_like_class_file(text: str) -> bool:
    """A ``--classes`` value names a file when it holds no comma and ends in ``.txt``, holds a path separator, or is
    an existing file with a suffix (``names.csv``); anything else is an inline list, even a single bare word that
    happens to name a file in the working directory."""
    if "," in text or ";" in text:
        return False
    if text.lower().endswith(".txt") or "/" in text or "\\" in text:
        return True
    path = Path(text).expanduser()
    return bool(path.suffix) and path.is_file()


def parse_class_list(text: str) -> list[list[str]]:
    """``"cat,dog;puppy,sky"`` -> ``[["cat"], ["dog", "puppy"], ["sky"]]`` (``;`` separates synonyms), or the
    contents of a class-name file (:func:`looks_like_class_file`; a missing one is an error, never a class name).
    A name given twice is an error: the second could never win, and scores are reported per name."""
    if looks_like_class_file(text):
        if not Path(text).expanduser().is_file():
            raise FileNotFoundError(f"class-name file {text!r} not found (for inline names, separate them with ',')")
        classes = read_class_names(Path(text).expanduser())
        if not classes:
            raise ValueError(f"no class names in {text!r}")
        check_unique_names(classes, text)
        return classes
    return parse_inline_classes(text)


def parse_inline_classes(text: str) -> list[list[str]]:
    """``"cat,dog;puppy,sky"`` -> ``[["cat"], ["dog", "puppy"], ["sky"]]``, never read as a file name (what
    ``ovseg demo`` does with the words typed in its page); no names, or a name given twice, is an error."""
    classes = [[s.strip() for s in item.split(";") if s.strip()] for item in text.split(",")]
    classes = [c for c in classes if c]
    if not classes:
        raise ValueError(f"no class names in {text!r}")
    check_unique_names(classes, text)
    return classes


def check_unique_names(classes: list[list[str]], source: str) -> None:
    """Raise naming ``source`` when a class name (any synonym) appears twice, in any letter case (``Cat`` and
    ``cat`` are one word to CLIP's lower-casing tokenizer)."""
    seen: dict[str, tuple[int, str]] = {}
    for index, synonyms in enumerate(classes):
        for name in synonyms:
            key = name.casefold()
            if key in seen and seen[key][0] != index:
                first = seen[key][1]
                same = repr(name) if first == name else f"{first!r} / {name!r}"
                raise ValueError(f"{source}: class name {same} is given twice (classes {seen[key][0]} and {index}); "
                                 "each name may name one class")
            seen.setdefault(key, (index, name))
