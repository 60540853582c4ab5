"""Label-id tables that define a benchmark's labels in terms of another's (facts about the datasets, used by the
converters in :mod:`ovseg.tools.convert` and by the synthetic data).

COCO-Object (background + 80 things) from COCO-Stuff train ids: things 0..79 -> 1..80, stuff 80..170 -> 0
(background), unlabeled 255 -> 0 as GroupViT's ``convert_coco_object.py`` does (the labels behind the
SCLIP-family COCO-Object numbers; see :mod:`ovseg.tools.convert.coco_object`) or 255 (``unlabeled="ignore"``).
"""

from __future__ import annotations

import numpy as np

IGNORE = 255
COCO_STUFF_NUM_CLASSES = 171
#: COCO-Stuff train ids 0..79 are things (raw ids 0..89), 80..170 stuff (raw 91..181)
COCO_NUM_THINGS = 80
COCO_OBJECT_UNLABELED = ("background", "ignore")


def coco_object_lut(unlabeled: str = "background") -> np.ndarray:
    """256-entry table from COCO-Stuff train ids to COCO-Object ids (0 = background, 1..80 things)."""
    if unlabeled not in COCO_OBJECT_UNLABELED:
        raise ValueError(f"unlabeled must be one of {COCO_OBJECT_UNLABELED}, got {unlabeled!r}")
    lut = np.full(256, IGNORE, dtype=np.uint8)
    lut[:COCO_NUM_THINGS] = np.arange(1, COCO_NUM_THINGS + 1)
    lut[COCO_NUM_THINGS:COCO_STUFF_NUM_CLASSES] = 0
    lut[IGNORE] = 0 if unlabeled == "background" else IGNORE
    return lut
