"""Auxiliary class texts: a definition or synonym per class, encoded beside the class names and mixed into their
embeddings (a protocol's ``auxiliary_texts`` / ``auxiliary_weight``, see :mod:`ovseg.eval.protocols`).

A file holds one ``name >=text`` line per class, in the class-name file's order, or per class but the background
class (ITACLIP's format: ``itaclip_segmentor.py`` ``get_aux_text`` keeps what follows ``>=``). Shipped:

- ``itaclip/*``: ITACLIP's LLaMA-3-generated texts (github.com/m-arda-aydn/ITACLIP ``llama_generated_texts/`` at
  commit 521a33c, byte for byte; Aydın et al., CVPRW 2025): the inputs of its published numbers.
"""

from __future__ import annotations

from pathlib import Path

AUXILIARY_DIR = Path(__file__).parent
#: ``itaclip_segmentor.py`` ``get_aux_text``: ``name.split('>=')[1]``
SEPARATOR = ">="


def resolve_auxiliary_file(name_or_path: str | Path) -> Path:
    shipped = AUXILIARY_DIR / f"{name_or_path}.txt"
    if shipped.is_file():
        return shipped
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    known = sorted(str(p.relative_to(AUXILIARY_DIR).with_suffix("")) for p in AUXILIARY_DIR.rglob("*.txt"))
    raise FileNotFoundError(f"auxiliary-text file {str(name_or_path)!r} not found: neither a file nor a shipped name "
                            f"({', '.join(known)})")


def read_auxiliary_texts(name_or_path: str | Path) -> list[tuple[str, str]]:
    """``(name, text)`` per line: the name before ``>=`` (stripped) and the text after it, as the reference reads
    it (the line without its newline, split at ``>=``, the second part, unstripped)."""
    path = resolve_auxiliary_file(name_or_path)
    entries = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        parts = line.split(SEPARATOR)
        if len(parts) < 2:
            raise ValueError(f"{path}:{lineno}: an auxiliary-text line reads 'name >=text', got {line!r}")
        entries.append((parts[0].strip(), parts[1]))
    if not entries:
        raise ValueError(f"{path}: auxiliary-text file is empty")
    return entries


def class_auxiliary_texts(source: str | Path, class_names: list[list[str]],
                          background_index: int | None) -> list[str | None]:
    """Each class's auxiliary text (None for the background class when the file skips it). The file's lines follow
    the classes in order, each line's name the class's first name (checked, so a file of another class list or
    order fails here rather than mixing the wrong texts)."""
    entries = read_auxiliary_texts(source)
    classes = list(range(len(class_names)))
    if len(entries) == len(classes) - 1 and background_index is not None:
        classes.remove(background_index)
    elif len(entries) != len(classes):
        raise ValueError(f"auxiliary-text file {str(source)!r} has {len(entries)} lines for {len(class_names)} classes "
                         "(one per class, or per class but the background class)")
    texts: list[str | None] = [None] * len(class_names)
    for c, (name, text) in zip(classes, entries):
        if name != class_names[c][0]:
            raise ValueError(f"auxiliary-text file {str(source)!r}: line for class {c} ({class_names[c][0]!r}) names "
                             f"{name!r}")
        texts[c] = text
    return texts
