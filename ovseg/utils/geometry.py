"""Image-size rules shared by the data pipeline and the evaluator."""

from __future__ import annotations

__all__ = ["keep_ratio_size"]


def keep_ratio_size(
    height: int, width: int, short_side: int | None, long_side_max: int | None, rule: str = "mmcv"
) -> tuple[int, int]:
    """The keep-ratio output size ``(h, w)``.

    ``mmcv``: ``rescale_size`` for ``scale=(long_side_max, short_side)``: the largest scale at which the short
    side is at most ``short_side`` and the long side at most ``long_side_max``, each side rounded.
    ``detectron2``: ``ResizeShortestEdge.get_output_shape``: the short side becomes ``short_side`` exactly, the
    long side follows, then both shrink if the long side exceeds ``long_side_max``; rounded at the end.
    """
    if rule == "detectron2":
        if not short_side:
            return height, width
        scale = short_side / min(height, width)
        new_h, new_w = (short_side, scale * width) if height < width else (scale * height, short_side)
        if long_side_max and max(new_h, new_w) > long_side_max:
            shrink = long_side_max / max(new_h, new_w)
            new_h, new_w = new_h * shrink, new_w * shrink
        return int(new_h + 0.5), int(new_w + 0.5)
    if rule != "mmcv":
        raise ValueError(f"resize rule must be 'mmcv' or 'detectron2', got {rule!r}")
    factors = []
    if short_side:
        factors.append(short_side / min(height, width))
    if long_side_max:
        factors.append(long_side_max / max(height, width))
    if not factors:
        return height, width
    scale = min(factors)
    return int(height * scale + 0.5), int(width * scale + 0.5)
