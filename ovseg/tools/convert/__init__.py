"""Dataset converters: official downloads -> the layouts of :mod:`ovseg.data.specs` (mmsegmentation's; CAT-Seg's for
ADE-847 and PC-459).

Each converter module has a ``convert_<name>(...)`` function (returns a summary dict of counts) and a
``register(subparsers)`` that adds its argparse subcommand (``set_defaults(func=main)``, ``main`` taking
the parsed namespace). Outputs are written atomically and skipped when they exist (``--overwrite``
rewrites them), so an interrupted conversion resumes.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from ovseg.tools.convert import ade847, cityscapes, coco_object, coco_stuff, pascal_context, pc459, voc_aug
from ovseg.tools.convert._common import ConversionError, ConversionWarning

CONVERTERS: dict[str, ModuleType] = {
    "pascal_context": pascal_context,
    "voc_aug": voc_aug,
    "coco_stuff": coco_stuff,
    "coco_object": coco_object,
    "cityscapes": cityscapes,
    "ade847": ade847,
    "pc459": pc459,
}

__all__ = ["CONVERTERS", "ConversionError", "ConversionWarning", "register_all"]


def register_all(subparsers: Any) -> None:
    """Add every converter's subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    for module in CONVERTERS.values():
        module.register(subparsers)
