"""Procedural toy-world scenes: exact label maps, class-agnostic instance masks and captions.

A scene is a list of :class:`Element` s painted in order onto a square canvas. The first element is a "stuff"
region covering the whole canvas, then up to two more stuff regions (sky above a wavy horizon, a road band,
a lake, a floor below a wall ...), then one to four "things" (ball, box, tree, house ...) that occlude each
other. Every pixel's class is the class of the element painted last there — the renderer writes the label
map with the same boolean masks it paints the colours with, so labels are exact by construction (no
anti-aliasing, no boundary band, no ignore pixels).

Each class has its own shape, colour and texture, so its name carries meaning: a red shaded disc with a
highlight is a ``ball``, a lilac block under a red roof is a ``house``, brick rows are a ``wall`` ...

A scene is a pure function of ``(seed, split, index, size)``: each image has its own random stream, so any
image can be regenerated alone and the val split does not depend on the number of train images. Rendering
is a pure function of the :class:`Scene` (texture noise comes from seeds stored in the element parameters).

On-disk layout under ``root`` (see :func:`generate`)::

    VOCdevkit/VOC2012/JPEGImages/<id>.jpg              images (read by the ``toyworld`` dataset spec)
    VOCdevkit/VOC2012/SegmentationClass/<id>.png       palette PNG label maps, ids = lines of toyworld.txt
    VOCdevkit/VOC2012/ImageSets/Segmentation/<split>.txt
    captions/<split>.jsonl                             {"id", "caption", "classes"} per image
    sa1b/sa_000000/sa_<n>.jpg + sa_<n>.json            train images again with SA-1B-format instance masks
    toyworld.json                                      generation settings, class list and counts (written last)
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from ovseg.data.specs import voc_palette
from ovseg.utils.io import atomic_open, atomic_save_png, atomic_write_json, atomic_write_text

#: bump when the scenes a seed produces change
VERSION = 1
STUFF: tuple[str, ...] = ("sky", "grass", "water", "sand", "road", "wall", "snow", "floor")
THINGS: tuple[str, ...] = ("ball", "box", "tree", "house", "car", "star", "flower", "fish", "cloud", "sun")
#: class id = position in this tuple = line of ``ovseg/data/classnames/toyworld.txt``; there is no background
CLASSES: tuple[str, ...] = STUFF + THINGS
CLASS_ID: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}
SPLITS: dict[str, int] = {"train": 0, "val": 1}
VOC_DIR = "VOCdevkit/VOC2012"
SA1B_DIR = "sa1b/sa_000000"
JPEG_QUALITY = 95
#: things (and extra stuff regions) with fewer visible pixels than this fraction of the image, or less than
#: MIN_VISIBLE_OWN of their own in-frame area, are removed from the scene before it is rendered
MIN_VISIBLE = 0.012
MIN_VISIBLE_OWN = 0.3
MAX_THINGS = 4
NOISE_SIGMA = 4.0

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of {}.",
    "a picture of {}.",
    "an image of {}.",
    "there is {} in the scene.",
    "a scene with {}.",
    "{}.",
)
ARTICLES: tuple[str, ...] = ("a ", "the ", "")


# --------------------------------------------------------------------------------------------------------------
# scenes
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Element:
    """One painted region: a class name and its geometry / colour / texture parameters (JSON values)."""

    name: str
    params: dict = field(default_factory=dict)

    @property
    def class_id(self) -> int:
        return CLASS_ID[self.name]


@dataclass(frozen=True)
class Scene:
    size: int
    elements: tuple[Element, ...]
    #: seed of the per-pixel sensor noise added after painting
    noise_seed: int = 0

    def to_json(self) -> dict:
        return {"size": self.size, "noise_seed": self.noise_seed,
                "elements": [{"name": e.name, "params": e.params} for e in self.elements]}


class Grid:
    """Pixel-centre coordinates of a square canvas (float64, so every mask is reproducible)."""

    def __init__(self, size: int):
        self.size = size
        self.yy, self.xx = (a + 0.5 for a in np.mgrid[0:size, 0:size].astype(np.float64))


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one image: independent of every other image and of the split sizes."""
    return np.random.default_rng([seed, SPLITS[split], index])


def file_id(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


# --------------------------------------------------------------------------------------------------------------
# geometry: boolean masks on the pixel grid
# --------------------------------------------------------------------------------------------------------------


def disc(g: Grid, cx: float, cy: float, r: float) -> np.ndarray:
    return (g.xx - cx) ** 2 + (g.yy - cy) ** 2 <= r * r


def ellipse(g: Grid, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return ((g.xx - cx) / rx) ** 2 + ((g.yy - cy) / ry) ** 2 <= 1.0


def rect(g: Grid, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return (g.xx >= x0) & (g.xx < x1) & (g.yy >= y0) & (g.yy < y1)


def polygon(g: Grid, points: list[tuple[float, float]]) -> np.ndarray:
    """Even-odd rule: a pixel centre is inside when a ray to +x crosses the outline an odd number of times."""
    inside = np.zeros(g.xx.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(points, points[1:] + points[:1]):
        if y1 == y2:
            continue
        crosses = (y1 > g.yy) != (y2 > g.yy)
        x_at = x1 + (x2 - x1) * (g.yy - y1) / (y2 - y1)
        inside ^= crosses & (g.xx < x_at)
    return inside


def star_points(cx: float, cy: float, r_out: float, r_in: float, rotation: float, n: int = 5) -> list:
    pts = []
    for k in range(2 * n):
        angle = rotation + math.pi * k / n - math.pi / 2
        r = r_out if k % 2 == 0 else r_in
        pts.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return pts


def curve(g: Grid, p: dict) -> np.ndarray:
    """A wavy line y(x) = y0 + amp·sin(freq·x + phase) + slope·(x - size/2), evaluated at every pixel."""
    return p["y0"] + p["amp"] * np.sin(p["freq"] * g.xx + p["phase"]) + p["slope"] * (g.xx - g.size / 2)


def region_mask(g: Grid, p: dict) -> np.ndarray:
    kind = p["region"]
    if kind == "full":
        return np.ones(g.xx.shape, dtype=bool)
    if kind == "above":
        return g.yy < curve(g, p)
    if kind == "below":
        return g.yy >= curve(g, p)
    if kind == "band":
        return np.abs(g.yy - (p["y0"] + p["slope"] * (g.xx - g.size / 2))) <= p["half"]
    if kind == "blob":
        return ellipse(g, p["cx"], p["cy"], p["rx"], p["ry"])
    raise ValueError(f"unknown region {kind!r}")


# --------------------------------------------------------------------------------------------------------------
# painters: element -> parts (mask, shader); a shader returns the full-canvas float RGB it paints the mask with
# --------------------------------------------------------------------------------------------------------------

Part = tuple[np.ndarray, Callable[[], np.ndarray]]


def _rgb(colour, tint) -> np.ndarray:
    return np.asarray(colour, dtype=np.float64) * np.asarray(tint, dtype=np.float64)


def _flat(g: Grid, colour) -> Callable[[], np.ndarray]:
    return lambda: np.broadcast_to(np.asarray(colour, dtype=np.float64), g.xx.shape + (3,))


def _radial(g: Grid, cx, cy, r, inner, outer) -> Callable[[], np.ndarray]:
    """Colour ``inner`` at the centre blending to ``outer`` at distance ``r``."""
    def shade():
        t = np.clip(np.sqrt((g.xx - cx) ** 2 + (g.yy - cy) ** 2) / r, 0, 1)[..., None]
        return np.asarray(inner) * (1 - t) + np.asarray(outer) * t
    return shade


# ---- stuff ----------------------------------------------------------------------------------------------------


def _stuff_shader(g: Grid, name: str, p: dict) -> Callable[[], np.ndarray]:
    tint, s = p["tint"], g.size

    def shade() -> np.ndarray:
        rng = np.random.default_rng(p["seed"])
        yy, xx = g.yy, g.xx
        if name == "sky":
            t = np.clip(yy / max(p.get("y0", s), 1.0), 0, 1)[..., None]
            out = _rgb((60, 120, 225), tint) * (1 - t) + _rgb((175, 210, 250), tint) * t
        elif name == "grass":
            columns = rng.random(g.size)[None, :]
            pixels = rng.random(xx.shape)
            v = (0.6 * columns + 0.4 * pixels)[..., None]
            out = _rgb((50, 140, 45), tint) * (0.7 + 0.6 * v)
        elif name == "water":
            ripple = np.sin(yy * (2 * math.pi / (s / 9)) + 1.5 * np.sin(xx * (2 * math.pi / (s / 3)) + p["tex_phase"]))
            out = _rgb((25, 85, 165), tint) + (ripple > 0.75)[..., None] * np.array([60.0, 75.0, 70.0])
        elif name == "sand":
            speckle = (rng.random(xx.shape) < 0.12)[..., None]
            out = np.where(speckle, _rgb((165, 145, 95), tint), _rgb((222, 200, 140), tint))
            out = out + rng.normal(0, 5, xx.shape)[..., None]
        elif name == "road":
            out = _rgb((92, 92, 98), tint) + rng.normal(0, 7, xx.shape)[..., None]
            lane = p["lane_y"] + p.get("slope", 0.0) * (xx - s / 2)
            dashes = (np.abs(yy - lane) < max(1.0, s / 80)) & (np.floor(xx / (s / 8)) % 2 == 0)
            out = np.where(dashes[..., None], _rgb((235, 235, 225), tint), out)
        elif name == "wall":
            bh = s / 12
            bw = 2 * bh
            row = np.floor(yy / bh)
            shifted = xx + (row % 2) * bw / 2
            brick = row * 100 + np.floor(shifted / bw)
            tone = rng.uniform(0.85, 1.1, 2000)[(brick.astype(np.int64) % 2000)][..., None]
            mortar = ((yy % bh) < 1.0) | ((shifted % bw) < 1.0)
            out = np.where(mortar[..., None], _rgb((205, 198, 188), tint), _rgb((172, 72, 52), tint) * tone)
        elif name == "snow":
            shade_ = 0.5 + 0.5 * np.sin(xx * (2 * math.pi / s) * 1.3 + p["tex_phase"]) * np.cos(yy * (2 * math.pi / s))
            out = _rgb((240, 244, 252), tint) - shade_[..., None] * np.array([22.0, 16.0, 4.0])
            out = out + rng.normal(0, 3, xx.shape)[..., None]
        elif name == "floor":
            ph = s / 10
            row = np.floor(yy / ph)
            tone = rng.uniform(0.8, 1.15, 64)[row.astype(np.int64) % 64][..., None]
            grain = 1 + 0.08 * np.sin(xx * 0.9 + row * 1.7)[..., None]
            out = _rgb((150, 98, 52), tint) * tone * grain
            out = np.where(((yy % ph) < 1.0)[..., None], _rgb((80, 50, 25), tint), out)
        else:
            raise ValueError(f"{name!r} is not a stuff class")
        return out

    return shade


def _paint_stuff(g: Grid, e: Element) -> list[Part]:
    return [(region_mask(g, e.params), _stuff_shader(g, e.name, e.params))]


# ---- things ---------------------------------------------------------------------------------------------------


def _paint_ball(g: Grid, p: dict) -> list[Part]:
    cx, cy, r, tint = p["cx"], p["cy"], p["r"], p["tint"]
    body = _radial(g, cx - 0.3 * r, cy - 0.3 * r, 1.5 * r, _rgb((235, 45, 50), tint), _rgb((120, 10, 20), tint))
    return [(disc(g, cx, cy, r), body),
            (disc(g, cx - 0.38 * r, cy - 0.38 * r, 0.22 * r), _flat(g, (250, 235, 235)))]


def _paint_box(g: Grid, p: dict) -> list[Part]:
    cx, cy, r, tint, a = p["cx"], p["cy"], p["r"], p["tint"], p["aspect"]
    hw, hh = 0.9 * r * math.sqrt(a), 0.9 * r / math.sqrt(a)
    edge = max(1.0, 0.12 * r)
    return [(rect(g, cx - hw, cy - hh, cx + hw, cy + hh), _flat(g, _rgb((130, 90, 45), tint))),
            (rect(g, cx - hw + edge, cy - hh + edge, cx + hw - edge, cy + hh - edge),
             _flat(g, _rgb((200, 150, 85), tint))),
            (rect(g, cx - hw + edge, cy - 0.12 * r, cx + hw - edge, cy + 0.12 * r),
             _flat(g, _rgb((230, 205, 150), tint)))]


def _paint_tree(g: Grid, p: dict) -> list[Part]:
    cx, cy, r, tint = p["cx"], p["cy"], p["r"], p["tint"]

    def leaves():
        rng = np.random.default_rng(p["seed"])
        light = (rng.random(g.xx.shape) < 0.25)[..., None]
        return np.where(light, _rgb((60, 150, 60), tint), _rgb((18, 92, 32), tint))

    return [(rect(g, cx - 0.17 * r, cy + 0.2 * r, cx + 0.17 * r, cy + 1.05 * r), _flat(g, _rgb((105, 62, 30), tint))),
            (disc(g, cx, cy - 0.2 * r, 0.78 * r), leaves)]


def _paint_house(g: Grid, p: dict) -> list[Part]:
    cx, cy, r, tint = p["cx"], p["cy"], p["r"], p["tint"]
    roof = [(cx - 1.05 * r, cy - 0.2 * r), (cx + 1.05 * r, cy - 0.2 * r), (cx, cy - 1.0 * r)]
    return [(rect(g, cx - 0.85 * r, cy - 0.2 * r, cx + 0.85 * r, cy + 0.95 * r), _flat(g, _rgb((192, 168, 232), tint))),
            (polygon(g, roof), _flat(g, _rgb((168, 38, 36), tint))),
            (rect(g, cx - 0.18 * r, cy + 0.4 * r, cx + 0.18 * r, cy + 0.95 * r), _flat(g, _rgb((92, 52, 30), tint))),
            (rect(g, cx + 0.35 * r, cy + 0.02 * r, cx + 0.68 * r, cy + 0.35 * r), _flat(g, (150, 210, 250))),
            (rect(g, cx - 0.68 * r, cy + 0.02 * r, cx - 0.35 * r, cy + 0.35 * r), _flat(g, (150, 210, 250)))]


def _paint_car(g: Grid, p: dict) -> list[Part]:
    cx, cy, r, tint = p["cx"], p["cy"], p["r"], p["tint"]
    body = _rgb((38, 62, 222), tint)
    cabin = [(cx - 0.62 * r, cy - 0.12 * r), (cx + 0.62 * r, cy - 0.12 * r), (cx + 0.4 * r, cy - 0.62 * r),
             (cx - 0.4 * r, cy - 0.62 * r)]
    window = [(cx - 0.45 * r, cy - 0.18 * r), (cx + 0.45 * r, cy - 0.18 * r), (cx + 0.32 * r, cy - 0.52 * r),
              (cx - 0.32 * r, cy - 0.52 * r)]
    return [(rect(g, cx - 1.1 * r, cy - 0.15 * r, cx + 1.1 * r, cy + 0.4 * r), _flat(g, body)),
            (polygon(g, cabin), _flat(g, body)),
            (polygon(g, window), _flat(g, (185, 225, 245))),
            (disc(g, cx - 0.6 * r, cy + 0.42 * r, 0.28 * r), _flat(g, (28, 28, 30))),
            (disc(g, cx + 0.6 * r, cy + 0.42 * r, 0.28 * r), _flat(g, (28, 28, 30)))]


def _paint_star(g: Grid, p: dict) -> list[Part]:
    cx, cy, r, tint = p["cx"], p["cy"], p["r"], p["tint"]
    shade = _radial(g, cx, cy, r, _rgb((255, 235, 90), tint), _rgb((225, 165, 10), tint))
    return [(polygon(g, star_points(cx, cy, r, 0.45 * r, p["rotation"])), shade)]


def _paint_flower(g: Grid, p: dict) -> list[Part]:
    cx, cy, r, tint, rot = p["cx"], p["cy"], p["r"], p["tint"], p["rotation"]
    petals = np.zeros(g.xx.shape, dtype=bool)
    for k in range(5):
        angle = rot + 2 * math.pi * k / 5
        petals |= disc(g, cx + 0.55 * r * math.cos(angle), cy + 0.55 * r * math.sin(angle), 0.42 * r)
    return [(petals, _flat(g, _rgb((228, 58, 178), tint))),
            (disc(g, cx, cy, 0.3 * r), _flat(g, _rgb((250, 220, 50), tint)))]


def _paint_fish(g: Grid, p: dict) -> list[Part]:
    cx, cy, r, tint, d = p["cx"], p["cy"], p["r"], p["tint"], p["facing"]
    tail = [(cx - d * 0.7 * r, cy), (cx - d * 1.25 * r, cy - 0.45 * r), (cx - d * 1.25 * r, cy + 0.45 * r)]
    orange = _rgb((250, 122, 22), tint)
    body = ellipse(g, cx, cy, 0.9 * r, 0.5 * r)
    return [(polygon(g, tail), _flat(g, _rgb((220, 90, 10), tint))),
            (body, _flat(g, orange)),
            (body & (np.abs(g.xx - cx) < max(0.6, 0.1 * r)), _flat(g, (250, 245, 235))),
            (disc(g, cx + d * 0.5 * r, cy - 0.1 * r, max(0.8, 0.1 * r)), _flat(g, (10, 10, 10)))]


def _paint_cloud(g: Grid, p: dict) -> list[Part]:
    cx, cy, r, tint = p["cx"], p["cy"], p["r"], p["tint"]
    mask = (disc(g, cx - 0.55 * r, cy + 0.05 * r, 0.45 * r) | disc(g, cx, cy - 0.2 * r, 0.58 * r)
            | disc(g, cx + 0.55 * r, cy + 0.05 * r, 0.45 * r) | rect(g, cx - 0.55 * r, cy, cx + 0.55 * r, cy + 0.5 * r))

    def shade():
        t = np.clip((g.yy - (cy - 0.8 * r)) / (1.3 * r), 0, 1)[..., None]
        return _rgb((252, 252, 254), tint) * (1 - t) + _rgb((200, 205, 215), tint) * t

    return [(mask, shade)]


def _paint_sun(g: Grid, p: dict) -> list[Part]:
    cx, cy, r, tint, rot = p["cx"], p["cy"], p["r"], p["tint"], p["rotation"]
    rays = np.zeros(g.xx.shape, dtype=bool)
    for k in range(8):
        a = rot + math.pi * k / 4
        ux, uy, w = math.cos(a), math.sin(a), 0.1 * r
        pts = [(cx + 0.55 * r * ux - w * uy, cy + 0.55 * r * uy + w * ux),
               (cx + 1.05 * r * ux - w * uy, cy + 1.05 * r * uy + w * ux),
               (cx + 1.05 * r * ux + w * uy, cy + 1.05 * r * uy - w * ux),
               (cx + 0.55 * r * ux + w * uy, cy + 0.55 * r * uy - w * ux)]
        rays |= polygon(g, pts)
    return [(rays, _flat(g, _rgb((255, 200, 40), tint))),
            (disc(g, cx, cy, 0.62 * r), _radial(g, cx, cy, 0.62 * r, _rgb((255, 250, 200), tint),
                                                _rgb((255, 185, 30), tint)))]


_THING_PAINTERS: dict[str, Callable[[Grid, dict], list[Part]]] = {
    "ball": _paint_ball, "box": _paint_box, "tree": _paint_tree, "house": _paint_house, "car": _paint_car,
    "star": _paint_star, "flower": _paint_flower, "fish": _paint_fish, "cloud": _paint_cloud, "sun": _paint_sun,
}
assert set(_THING_PAINTERS) == set(THINGS)


def element_parts(g: Grid, e: Element) -> list[Part]:
    """The (mask, shader) parts of an element, in paint order; all parts carry the element's class."""
    if e.name in STUFF:
        return _paint_stuff(g, e)
    return _THING_PAINTERS[e.name](g, e.params)


def element_mask(g: Grid, e: Element) -> np.ndarray:
    """Every pixel the element paints (the union of its parts), before occlusion by later elements."""
    mask = np.zeros(g.xx.shape, dtype=bool)
    for part, _ in element_parts(g, e):
        mask |= part
    return mask


# --------------------------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------------------------

_GROUND = ("grass", "water", "sand", "road", "snow")


def _tint(rng: np.random.Generator) -> list[float]:
    base = rng.uniform(0.88, 1.1)
    return [round(float(base * rng.uniform(0.95, 1.05)), 4) for _ in range(3)]


def _stuff(rng: np.random.Generator, name: str, **region) -> Element:
    params = {**region, "tint": _tint(rng), "seed": int(rng.integers(2**31)),
              "tex_phase": float(rng.uniform(0, 2 * math.pi))}
    return Element(name, params)


def _wavy(rng: np.random.Generator, s: int, y0: float, amp: float) -> dict:
    return {"y0": float(y0), "amp": float(amp), "freq": float(rng.uniform(1.0, 3.0) * 2 * math.pi / s),
            "phase": float(rng.uniform(0, 2 * math.pi)), "slope": float(rng.uniform(-0.15, 0.15))}


def _road_band(rng: np.random.Generator, s: int) -> dict:
    y0 = float(rng.uniform(0.3, 0.8) * s)
    slope = float(rng.uniform(-0.3, 0.3))
    return {"region": "band", "y0": y0, "slope": slope, "half": float(rng.uniform(0.09, 0.16) * s), "lane_y": y0}


def _sample_stuff(rng: np.random.Generator, s: int) -> list[Element]:
    # No two classes always occur together (a caption could not tell their names apart): a wall stands on a
    # floor or on outdoor ground, a floor is also seen from above without a wall.
    layout = rng.choice(["outdoor", "indoor", "field"], p=[0.5, 0.2, 0.3])
    if layout == "indoor":
        wall = _stuff(rng, "wall", region="full")
        below = "floor" if rng.random() < 0.6 else str(rng.choice(_GROUND))
        extra = {"lane_y": float(rng.uniform(0.85, 0.95) * s)} if below == "road" else {}
        return [wall, _stuff(rng, below, region="below", **_wavy(rng, s, rng.uniform(0.5, 0.8) * s, 0.0), **extra)]
    ground = str(rng.choice(_GROUND + ("floor",) if layout == "field" else _GROUND))
    base_extra = {"lane_y": float(rng.uniform(0.3, 0.8) * s), "slope": 0.0} if ground == "road" else {}
    elements = [_stuff(rng, ground, region="full", **base_extra)]
    if rng.random() < 0.5:
        second = str(rng.choice([n for n in _GROUND if n != ground]))
        if second == "road":
            elements.append(_stuff(rng, second, **_road_band(rng, s)))
        elif second == "water" and rng.random() < 0.5:
            elements.append(_stuff(rng, second, region="blob", cx=float(rng.uniform(0.2, 0.8) * s),
                                   cy=float(rng.uniform(0.5, 0.9) * s), rx=float(rng.uniform(0.2, 0.4) * s),
                                   ry=float(rng.uniform(0.1, 0.25) * s)))
        else:
            elements.append(_stuff(rng, second, region="below",
                                   **_wavy(rng, s, rng.uniform(0.6, 0.85) * s, rng.uniform(0, 0.05) * s)))
    if layout == "outdoor":
        horizon = rng.uniform(0.25, 0.55) * s
        elements.append(_stuff(rng, "sky", region="above", **_wavy(rng, s, horizon, rng.uniform(0, 0.06) * s)))
    return elements


def _sample_thing(rng: np.random.Generator, s: int) -> Element:
    name = str(rng.choice(THINGS))
    p = {"cx": float(rng.uniform(0.1, 0.9) * s), "cy": float(rng.uniform(0.1, 0.9) * s),
         "r": float(rng.uniform(0.1, 0.2) * s), "tint": _tint(rng)}
    if name == "box":
        p["aspect"] = float(rng.uniform(0.75, 1.35))
    if name in ("star", "flower", "sun"):
        p["rotation"] = float(rng.uniform(0, 2 * math.pi))
    if name == "fish":
        p["facing"] = int(rng.choice([-1, 1]))
    if name == "tree":
        p["seed"] = int(rng.integers(2**31))
    return Element(name, p)


def _owners(masks: list[np.ndarray]) -> np.ndarray:
    """Index+1 of the last element covering each pixel (0 = none)."""
    owner = np.zeros(masks[0].shape, dtype=np.int32)
    for k, m in enumerate(masks):
        owner[m] = k + 1
    return owner


def sample_scene(rng: np.random.Generator, size: int = 96) -> Scene:
    """Stuff regions, then 1..MAX_THINGS things; elements left barely visible by occlusion are removed."""
    g = Grid(size)
    elements = _sample_stuff(rng, size)
    num_stuff = len(elements)
    elements += [_sample_thing(rng, size) for _ in range(int(rng.integers(1, MAX_THINGS + 1)))]
    noise_seed = int(rng.integers(2**31))
    masks = [element_mask(g, e) for e in elements]
    # dropping an element only uncovers others, so this ends; the base region (index 0) always stays
    while True:
        owner = _owners(masks)
        visible = np.bincount(owner.ravel(), minlength=len(masks) + 1)[1:]
        drop = [k for k in range(1, len(elements))
                if visible[k] < max(MIN_VISIBLE * size * size, MIN_VISIBLE_OWN * masks[k].sum())]
        if not drop:
            break
        # the least visible element goes first: removing it may uncover enough of the others
        k = min(drop, key=lambda i: (visible[i] / max(masks[i].sum(), 1), i))
        del elements[k], masks[k]
        if k < num_stuff:
            num_stuff -= 1
    return Scene(size, tuple(elements), noise_seed)


def scene_for(seed: int, split: str, index: int, size: int = 96) -> tuple[Scene, np.random.Generator]:
    """The scene of image ``index`` of ``split``, and its random stream (positioned for the caption)."""
    rng = image_rng(seed, split, index)
    return sample_scene(rng, size), rng


# --------------------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------------------


def render_scene(scene: Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paint a scene: RGB uint8 [S,S,3], label uint8 [S,S] (class ids) and instances int32 [S,S] (element index+1).

    The label and instance maps are written with the very masks the colours are painted with.
    """
    g = Grid(scene.size)
    canvas = np.zeros(g.xx.shape + (3,), dtype=np.float64)
    label = np.full(g.xx.shape, 255, dtype=np.uint8)
    instances = np.zeros(g.xx.shape, dtype=np.int32)
    for k, e in enumerate(scene.elements):
        for mask, shade in element_parts(g, e):
            if not mask.any():
                continue
            canvas[mask] = shade()[mask]
            label[mask] = e.class_id
            instances[mask] = k + 1
    if (label == 255).any():
        raise AssertionError("the first element of a scene must cover the canvas")
    canvas += np.random.default_rng(scene.noise_seed).normal(0, NOISE_SIGMA, canvas.shape)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return image, label, instances


def classes_present(label: np.ndarray) -> list[str]:
    return [CLASSES[i] for i in np.unique(label).tolist() if i < len(CLASSES)]


def make_caption(names: list[str], rng: np.random.Generator) -> str:
    """A caption naming exactly ``names`` (in random order, random articles, random template)."""
    if not names:
        raise ValueError("a caption needs at least one class")
    order = rng.permutation(len(names))
    items = [f"{ARTICLES[int(rng.integers(len(ARTICLES)))]}{names[i]}" for i in order]
    listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(listed)


def instance_annotations(instances: np.ndarray, image_id: int) -> list[dict]:
    """SA-1B-style annotations: one COCO-RLE mask per visible element (class-agnostic), in paint order."""
    from pycocotools import mask as mask_utils

    height, width = instances.shape
    annotations = []
    for k in np.unique(instances).tolist():
        if k == 0:
            continue
        mask = instances == k
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        flat = np.flatnonzero(mask)
        point = int(flat[len(flat) // 2])
        annotations.append({
            "id": image_id * 1000 + len(annotations),
            "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "area": int(mask.sum()),
            "predicted_iou": 1.0,
            "point_coords": [[float(point % width) + 0.5, float(point // width) + 0.5]],
            "crop_box": [0.0, 0.0, float(width), float(height)],
            "stability_score": 1.0,
        })
    return annotations


# --------------------------------------------------------------------------------------------------------------
# writing a root
# --------------------------------------------------------------------------------------------------------------


@dataclass
class GeneratedImage:
    id: str
    jpeg: bytes
    label: np.ndarray
    instances: np.ndarray
    caption: str
    classes: list[str]


def make_image(seed: int, split: str, index: int, size: int = 96) -> GeneratedImage:
    scene, rng = scene_for(seed, split, index, size)
    image, label, instances = render_scene(scene)
    names = classes_present(label)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return GeneratedImage(file_id(split, index), buf.getvalue(), label, instances, make_caption(names, rng), names)


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def iter_split(seed: int, split: str, num: int, size: int) -> Iterator[GeneratedImage]:
    for index in range(num):
        yield make_image(seed, split, index, size)


def generate(root: str | Path, num_train: int = 4000, num_val: int = 300, seed: int = 0, size: int = 96,
             masks: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Write a toy world under ``root``; returns the summary also written to ``root/toyworld.json``.

    ``masks`` writes the train split a second time as SA-1B-format image + JSON pairs (PixelCLIP's input).
    Existing files are replaced atomically; ``toyworld.json`` is written last.
    """
    root = Path(root)
    start = time.perf_counter()
    palette = voc_palette(256)
    counts: dict[str, int] = {}
    for split, num in (("train", num_train), ("val", num_val)):
        ids, caption_lines = [], []
        class_counts = np.zeros(len(CLASSES), dtype=np.int64)
        for index, item in enumerate(iter_split(seed, split, num, size)):
            ids.append(item.id)
            _write_bytes(root / VOC_DIR / "JPEGImages" / f"{item.id}.jpg", item.jpeg)
            atomic_save_png(root / VOC_DIR / "SegmentationClass" / f"{item.id}.png", item.label, palette=palette)
            caption_lines.append(json.dumps({"id": item.id, "caption": item.caption, "classes": item.classes}))
            class_counts[[CLASS_ID[n] for n in item.classes]] += 1
            if masks and split == "train":
                sa_id = index + 1
                _write_bytes(root / SA1B_DIR / f"sa_{sa_id}.jpg", item.jpeg)
                record = {"image": {"image_id": sa_id, "width": size, "height": size, "file_name": f"sa_{sa_id}.jpg",
                                    "toyworld_id": item.id},
                          "annotations": instance_annotations(item.instances, sa_id)}
                atomic_write_text(root / SA1B_DIR / f"sa_{sa_id}.json", json.dumps(record, separators=(",", ":")))
            if log is not None and (index + 1) % 1000 == 0:
                log(f"{split}: {index + 1}/{num} images ({time.perf_counter() - start:.0f} s)")
        if num:
            atomic_write_text(root / VOC_DIR / "ImageSets/Segmentation" / f"{split}.txt", "\n".join(ids) + "\n")
            atomic_write_text(root / "captions" / f"{split}.jsonl", "\n".join(caption_lines) + "\n")
        counts[split] = num
        counts[f"{split}_images_per_class"] = class_counts.tolist()
    # PixelCLIP reads every pair in the SA-1B folder: pairs of an earlier, larger (or masked) world must go
    kept = num_train if masks else 0
    for path in (root / SA1B_DIR).glob("sa_*.*") if (root / SA1B_DIR).is_dir() else []:
        number = path.stem[3:]
        if path.suffix in (".jpg", ".json") and number.isdigit() and int(number) > kept:
            path.unlink()
    summary = {"version": VERSION, "seed": seed, "size": size, "num_train": num_train, "num_val": num_val,
               "masks": masks, "classes": list(CLASSES), "images_per_class": {
                   split: dict(zip(CLASSES, counts[f"{split}_images_per_class"])) for split in ("train", "val")}}
    atomic_write_json(root / "toyworld.json", summary)
    return summary


def read_captions(root: str | Path, split: str) -> list[dict]:
    path = Path(root) / "captions" / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no toy-world captions (run `ovseg toyworld generate --root {root}`)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
