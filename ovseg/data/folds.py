"""4-fold class splits of CLIP-S4's class-free / unknown-class protocol, and training vocabularies.

The 59 PC-59 classes, in the standard (alphabetical) order of ``classnames/context59.txt``, are split
into four folds of 15/15/15/14 consecutive classes. For fold ``i`` a model trains with the other three
folds' names as its known classes (fold ``i``'s names never reach it) and is evaluated on PC-59 val
with all 59 names. The names below are PC-59's usual spellings; the class-name file spells "airplane" as
"aeroplane" (:data:`ALIASES`), and the training vocabulary uses the class-name file's spelling, which
is what the evaluator encodes at test time.

The toy world (``ovseg toyworld``) gets a toy version built by the same rule: its 18 classes in
alphabetical order, four consecutive folds of 5/5/4/4 (``numpy.array_split``, which also gives PC-59's
15/15/15/14): ball…fish | floor…road | sand…star | sun…water.
"""

from __future__ import annotations

from ovseg.data.classnames import read_class_names

__all__ = ["CONTEXT_FOLDS", "ALIASES", "FOLD_DATASETS", "alphabetical_folds", "fold_classes", "known_classes",
           "resolve_vocabulary"]

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


def alphabetical_folds(names: list[str], num_folds: int = 4) -> tuple[tuple[str, ...], ...]:
    """``names`` sorted, cut into ``num_folds`` consecutive folds whose sizes differ by at most one
    (larger folds first, as ``numpy.array_split``)."""
    import numpy as np

    ordered = np.array(sorted(names), dtype=object)
    return tuple(tuple(str(n) for n in fold) for fold in np.array_split(ordered, num_folds))


def _dataset_names(dataset: str) -> list[str]:
    return [synonyms[0] for synonyms in read_class_names(dataset) if synonyms[0] != "background"]


def _folds(dataset: str) -> tuple[tuple[str, ...], ...]:
    if dataset == "context59":
        return tuple(tuple(ALIASES.get(n, n) for n in fold) for fold in CONTEXT_FOLDS)
    if dataset == "toyworld":
        return alphabetical_folds(_dataset_names("toyworld"))
    raise ValueError(f"no unknown-class folds for {dataset!r}; datasets with folds: {', '.join(FOLD_DATASETS)}")


#: datasets with a 4-fold unknown-class split (``known_classes: <dataset>-fold<i>``)
FOLD_DATASETS = ("context59", "toyworld")


def fold_classes(fold: int, dataset: str = "context59") -> list[str]:
    """The held-out (unknown) classes of ``fold``, spelled as in the dataset's class-name file."""
    folds = _folds(dataset)
    if fold not in range(len(folds)):
        raise ValueError(f"{dataset} fold must be 0..{len(folds) - 1}, got {fold}")
    names = list(folds[fold])
    all_names = _dataset_names(dataset)
    missing = [n for n in names if n not in all_names]
    if missing:
        raise ValueError(f"{dataset} fold {fold} names not in {dataset}.txt: {missing}")
    return names


def known_classes(fold: int, dataset: str = "context59") -> list[str]:
    """The training vocabulary for ``fold``: every class of the other folds, in class-file order."""
    held_out = set(fold_classes(fold, dataset))
    return [n for n in _dataset_names(dataset) if n not in held_out]


def resolve_vocabulary(vocabulary: str | list[str]) -> list[str]:
    """A training vocabulary: a list of names as given; ``"<dataset>-fold{i}"`` (``context59-fold0``,
    ``toyworld-fold2``) -> :func:`known_classes`; any other string names a class-name file (``voc20``,
    ``context59`` …) -> the first synonym of each class ("background" dropped)."""
    if not isinstance(vocabulary, str):
        names = [str(n) for n in vocabulary]
        if not names:
            raise ValueError("the training vocabulary is empty")
        return names
    dataset, sep, fold = vocabulary.rpartition("-fold")
    if sep and dataset in FOLD_DATASETS and fold.isdigit():
        return known_classes(int(fold), dataset)
    return _dataset_names(vocabulary)
