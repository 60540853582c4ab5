"""Pascal Context 4-fold split of CLIP-S4 (class-free / unknown-class segmentation) and training
vocabularies.

The 59 PC-59 classes, in the standard (alphabetical) order of ``classnames/context59.txt``, are split
into four folds of 15/15/15/14 consecutive classes. For fold ``i`` a model trains with the other three
folds' names as its known classes (fold ``i``'s names never reach it) and is evaluated on PC-59 val
with all 59 names. The names below are the spec's; the class-name file spells "airplane" as
"aeroplane" (:data:`ALIASES`), and the training vocabulary uses the class-name file's spelling, which
is what the evaluator encodes at test time.
"""

from __future__ import annotations

from ovseg.data.classnames import read_class_names

__all__ = ["CONTEXT_FOLDS", "ALIASES", "fold_classes", "known_classes", "resolve_vocabulary"]

CONTEXT_FOLDS: tuple[tuple[str, ...], ...] = (
    ("airplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building", "bus",
     "cabinet", "car", "cat"),
    ("ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog", "door", "fence", "floor", "flower",
     "food", "grass", "ground"),
    ("horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform", "potted plant",
     "road", "rock", "sheep", "shelves", "sidewalk"),
    ("sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tv monitor", "wall", "water",
     "window", "wood"),
)
#: spec spelling -> class-name file spelling
ALIASES = {"airplane": "aeroplane"}


def _context59_names() -> list[str]:
    return [synonyms[0] for synonyms in read_class_names("context59")]


def fold_classes(fold: int) -> list[str]:
    """The held-out (unknown) classes of ``fold``, spelled as in ``context59.txt``."""
    if fold not in range(len(CONTEXT_FOLDS)):
        raise ValueError(f"Pascal Context fold must be 0..3, got {fold}")
    names = [ALIASES.get(n, n) for n in CONTEXT_FOLDS[fold]]
    pc59 = _context59_names()
    missing = [n for n in names if n not in pc59]
    if missing:
        raise ValueError(f"fold {fold} names not in context59.txt: {missing}")
    return names


def known_classes(fold: int) -> list[str]:
    """The training vocabulary for ``fold``: every PC-59 class of the other three folds, PC-59 order."""
    held_out = set(fold_classes(fold))
    return [n for n in _context59_names() if n not in held_out]


def resolve_vocabulary(vocabulary: str | list[str]) -> list[str]:
    """A training vocabulary: a list of names as given; ``"context59-fold{i}"`` -> :func:`known_classes`;
    any other string names a class-name file (``voc20``, ``context59`` …) -> the first synonym of each
    class ("background" dropped)."""
    if not isinstance(vocabulary, str):
        names = [str(n) for n in vocabulary]
        if not names:
            raise ValueError("the training vocabulary is empty")
        return names
    if vocabulary.startswith("context59-fold"):
        return known_classes(int(vocabulary[len("context59-fold"):]))
    return [s[0] for s in read_class_names(vocabulary) if s[0] != "background"]
