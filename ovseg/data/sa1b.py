"""SA-1B-format files: images with class-agnostic masks (PixelCLIP's training data; the recipe that turns them into
training views is :mod:`ovseg.methods.pixelclip.data`).

Layouts: the SA-1B tar files as downloaded (``sa_000000.tar`` …, each ``sa_N.jpg`` + ``sa_N.json``; read in place
by :class:`SA1BTars`), or any folder (searched recursively) of ``<name>.jpg`` + ``<name>.json`` pairs, as extracted
from them (``sa_000000/sa_1.jpg`` + ``sa_1.json``) or written by ``ovseg masks sam|dino|downscale``
(:class:`SA1BFolder`). Each JSON is ``{"image": {...}, "annotations": [{"segmentation": {"size": [h, w],
"counts": str}, ...}]}``; :class:`MaskRecord` holds its RLEs undecoded (their run lengths checked when read) and
decodes what a crop needs. Broken files (unreadable JSON, RLE size different from the image, RLE strings whose runs
do not cover the image, no masks) raise :class:`DataError` naming the file or member; backup copies of a tar or image
(same name and size in another subfolder, whose samples would train twice) are refused.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ovseg.data.files import DataError, files_fingerprint, read_image
from ovseg.utils.io import atomic_open

__all__ = ["IMAGE_SUFFIXES", "find_pairs", "encode_mask", "decode_masks", "rle_run_lengths", "decode_rle_columns",
           "decode_rle_grid", "check_rle_counts", "MaskRecord", "load_masks", "downscaled_size", "downscale_image",
           "cv2_nearest_index", "SA1BFolder", "SA1BTars", "write_synthetic_sa1b", "write_sa1b_tars"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# -- files ----------------------------------------------------------------------------------------------------------
def refuse_copies(paths: list[Path], what: str) -> None:
    """Raise :class:`DataError` when two of ``paths`` have the same name and size: a backup copy in a subfolder
    (``old/sa_000000.tar``) would make its samples train twice."""
    seen: dict[tuple[str, int], Path] = {}
    for path in paths:
        key = (path.name, path.stat().st_size)
        if key in seen:
            raise DataError(f"SA-1B: {seen[key]} and {path} look like copies of one {what} (same name and size); "
                            f"its samples would train twice: move one out of the data folder")
        seen[key] = path


def find_pairs(folder: str | Path, require_json: bool = True) -> tuple[list[tuple[Path, Path | None]], list[Path]]:
    """(image, json) pairs under ``folder`` sorted by path, and the images that have no JSON. Copies of one image
    (same name and size, in two subfolders) raise :class:`DataError`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"SA-1B folder not found: {folder}")
    pairs, missing = [], []
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    refuse_copies(images, "image")
    for image in images:
        ann = image.with_suffix(".json")
        if ann.is_file():
            pairs.append((image, ann))
        elif require_json:
            missing.append(image)
        else:
            pairs.append((image, None))
    return pairs, missing


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """A binary mask [H,W] -> COCO RLE with str counts (the SA-1B JSON form)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_masks(rles: list[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """COCO RLEs -> bool masks [N, H, W] in one pycocotools call."""
    from pycocotools import mask as mask_utils

    if not rles:
        return np.zeros((0, height, width), dtype=bool)
    decoded = mask_utils.decode(_coco_rles(rles))  # [H, W, N] uint8, Fortran order
    return np.ascontiguousarray(decoded.transpose(2, 0, 1)).astype(bool)


def _coco_rles(rles: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """RLEs as pycocotools takes them (bytes counts)."""
    return [{"size": list(r["size"]), "counts": r["counts"].encode("ascii") if isinstance(r["counts"], str)
             else r["counts"]} for r in rles]


def rle_run_lengths(counts: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Run lengths of COCO compressed RLE strings, all masks at once: (lengths, mask index of each run).

    The string format is pycocotools' ``rleFrString``: each value is 5-bit groups (low bits first, 0x20 = more
    follow, 0x10 of the last group = negative), offset by 48; from the fourth value on it is a difference to the
    value two places before.
    """
    if not counts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    chars = np.frombuffer(b"".join(counts), dtype=np.uint8).astype(np.int64) - 48
    last = (chars & 0x20) == 0  # last 5-bit group of a value
    value_end = np.flatnonzero(last)
    value_start = np.concatenate(([0], value_end[:-1] + 1))
    group = np.arange(len(chars)) - np.repeat(value_start, value_end - value_start + 1)
    values = np.add.reduceat((chars & 0x1F) << (5 * group), value_start)
    negative = (chars[value_end] & 0x10) != 0
    values = np.where(negative, values - (np.int64(1) << (5 * (group[value_end] + 1))), values)
    # values per mask: split where one string ends
    string_ends = np.cumsum([len(c) for c in counts])
    mask_of_value = np.searchsorted(string_ends, value_end, side="right")
    values_per_mask = np.bincount(mask_of_value, minlength=len(counts))
    first_value = np.concatenate(([0], np.cumsum(values_per_mask)[:-1]))
    position = np.arange(len(values)) - np.repeat(first_value, values_per_mask)
    # undo the differences: position m >= 3 adds the decoded value at m - 2, i.e. a running sum per parity
    lengths = values.copy()
    for parity in (0, 1):
        chain = (position % 2 == parity) & (position >= (2 if parity == 0 else 1))
        running = np.cumsum(np.where(chain, values, 0))
        before_mask = np.repeat(np.concatenate(([0], running))[first_value], values_per_mask)
        lengths = np.where(chain, running - before_mask, lengths)
    return lengths, mask_of_value


def check_rle_counts(counts: list[str], height: int, width: int, source: str = "RLE") -> None:
    """Raise :class:`DataError` naming ``source`` and the first bad mask unless every COCO RLE string parses and its
    runs cover ``height`` × ``width`` pixels exactly. Cheap (the run lengths, no decode); what a lazy crop decode
    needs to know up front, since a garbage string otherwise gives a nonsense box and is never decoded."""
    encoded = [c.encode("ascii") if c.isascii() else b"" for c in counts]
    for i, c in enumerate(encoded):
        # every character in pycocotools' range (48 + 6 bits), the last one ending a value (no 0x20 "more" bit)
        if not c or min(c) < 48 or max(c) > 48 + 0x3F or (c[-1] - 48) & 0x20:
            raise DataError(f"{source}: RLE of mask {i} is malformed (not a COCO compressed RLE string)")
    _check_runs(*rle_run_lengths(encoded), len(encoded), height * width, source)


def _check_runs(lengths: np.ndarray, mask_of_run: np.ndarray, n: int, size: int, source: str) -> None:
    if (lengths < 0).any():
        bad = int(mask_of_run[np.flatnonzero(lengths < 0)[0]])
        raise DataError(f"{source}: RLE of mask {bad} is malformed (negative run length)")
    totals = np.bincount(mask_of_run, weights=lengths, minlength=n).astype(np.int64)
    if (totals != size).any():
        bad = int(np.flatnonzero(totals != size)[0])
        raise DataError(f"{source}: RLE of mask {bad} covers {int(totals[bad])} pixels, the image has {size}")


def decode_rle_columns(counts: list[bytes], height: int, width: int, col_start: int, col_stop: int,
                       source: str = "RLE") -> np.ndarray:
    """Columns ``col_start:col_stop`` of COCO compressed RLE masks, without decoding the rest: uint8
    ``[N, col_stop - col_start, height]`` (column-major, as the RLE runs; ``.transpose(0, 2, 1)`` is the [N, H, W]
    view). Equal to ``pycocotools.mask.decode`` on those columns; a run total other than ``height`` × ``width``
    raises :class:`DataError` naming ``source``."""
    return decode_rle_grid(counts, height, width, np.arange(col_start, max(col_start, col_stop)), None, source)


def decode_rle_grid(counts: list[bytes], height: int, width: int, cols: np.ndarray, rows: np.ndarray | None = None,
                    source: str = "RLE") -> np.ndarray:
    """Pixels (``rows[i]``, ``cols[j]``) of COCO compressed RLE masks, decoding nothing else: uint8
    ``[N, len(cols), len(rows)]`` (column-major; ``rows`` None: every row). ``cols`` and ``rows`` are strictly
    increasing. Equal to ``pycocotools.mask.decode(...)[rows][:, cols]``; with every other row and column (a mask
    halved at read time, :meth:`MaskRecord.decode_columns`) it writes a quarter of the pixels of the full block.
    A run total other than ``height`` × ``width`` raises :class:`DataError` naming ``source``.

    Each selected column of each mask is cut into the pieces of the runs that cross it (run ends found by
    ``searchsorted``); a piece contributes as many output pixels as selected rows it covers.
    """
    n, cols = len(counts), np.asarray(cols, dtype=np.int64)
    out_rows = height if rows is None else len(rows)
    if not n or not len(cols) or not out_rows:
        return np.zeros((n, len(cols), out_rows), dtype=np.uint8)
    lengths, mask_of_run = rle_run_lengths(counts)
    size = height * width
    _check_runs(lengths, mask_of_run, n, size, source)
    ends = np.cumsum(lengths)  # masks back to back: mask m's pixel p is at m * size + p
    runs_per_mask = np.bincount(mask_of_run, minlength=n)
    first_run = np.concatenate(([0], np.cumsum(runs_per_mask)[:-1]))
    value = ((np.arange(len(lengths)) - np.repeat(first_run, runs_per_mask)) % 2).astype(np.uint8)  # 0 first
    top = (np.arange(n)[:, None] * size + cols[None, :] * height).ravel()  # each (mask, column)'s first pixel
    first = np.searchsorted(ends, top, side="right")
    pieces = np.searchsorted(ends, top + height - 1, side="right") - first + 1
    piece_top = np.repeat(top, pieces)
    run = np.repeat(first, pieces) + np.arange(int(pieces.sum())) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    start = np.maximum(ends[run] - lengths[run], piece_top) - piece_top  # rows of the piece in its column
    stop = np.minimum(ends[run], piece_top + height) - piece_top
    if rows is not None:
        start, stop = np.searchsorted(rows, start), np.searchsorted(rows, stop)
    return np.repeat(value[run], stop - start).reshape(n, len(cols), out_rows)


class MaskRecord:
    """The class-agnostic masks of one image as COCO RLEs, validated but not decoded (crowd masks dropped).

    ``decode()`` gives all masks (largest first); :meth:`decode_columns` decodes a column range of chosen masks,
    which is what a training crop needs. ``source`` names the file (or tar member) in errors.
    """

    def __init__(self, rles: list[dict[str, Any]], height: int, width: int, source: str):
        self.height, self.width, self.source = height, width, source
        self.rles = _coco_rles(rles)
        #: set when the image was resized after reading (``downscale``): its pixel (r, c) is mask pixel
        #: (``pixel_rows[r]``, ``pixel_cols[c]``)
        self.pixel_rows: np.ndarray | None = None
        self.pixel_cols: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rles)

    @classmethod
    def parse(cls, data: bytes | str, height: int, width: int, source: str) -> MaskRecord:
        """From SA-1B JSON text. Raises :class:`DataError` naming ``source`` for unparsable JSON, a missing
        ``annotations`` list, an annotation without a COCO RLE, an RLE whose size differs from the image's
        ``height`` × ``width``, or no masks at all."""
        try:
            record = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{source}: cannot parse mask JSON ({e})") from None
        annotations = record.get("annotations") if isinstance(record, dict) else None
        if not isinstance(annotations, list):
            raise DataError(f"{source}: no 'annotations' list (not an SA-1B mask file)")
        rles = []
        for i, ann in enumerate(annotations):
            if ann.get("iscrowd", 0):
                continue
            seg = ann.get("segmentation")
            if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
                raise DataError(f"{source}: annotation {i} has no COCO RLE segmentation")
            if [int(v) for v in seg["size"]] != [height, width]:
                raise DataError(f"{source}: annotation {i} has RLE size {list(seg['size'])} but the image is "
                                f"{height}x{width}")
            if not isinstance(seg["counts"], str):
                raise DataError(f"{source}: annotation {i} has uncompressed RLE counts; SA-1B files hold strings")
            rles.append(seg)
        if not rles:
            raise DataError(f"{source}: image has zero masks")
        check_rle_counts([r["counts"] for r in rles], height, width, source)
        return cls(rles, height, width, source)

    @classmethod
    def read(cls, json_path: str | Path, height: int, width: int) -> MaskRecord:
        try:
            data = Path(json_path).read_bytes()
        except FileNotFoundError:
            raise DataError(f"{json_path}: mask JSON not found") from None
        return cls.parse(data, height, width, str(json_path))

    def _coco(self, call, *args):
        try:
            return call(self.rles, *args)
        except Exception as e:  # pycocotools raises bare errors on malformed counts
            raise DataError(f"{self.source}: cannot decode RLE ({e})") from None

    def largest_first(self) -> np.ndarray:
        """Mask indices by pixel area, largest first (stable: ties keep file order); areas from the RLE runs."""
        from pycocotools import mask as mask_utils

        return np.argsort(-self._coco(mask_utils.area).astype(np.int64), kind="stable")

    def boxes(self) -> np.ndarray:
        """[N, 4] (x, y, w, h) of each mask, from the RLE (a JSON ``bbox`` may be rounded or missing)."""
        from pycocotools import mask as mask_utils

        return self._coco(mask_utils.toBbox).reshape(-1, 4)

    def decode(self) -> np.ndarray:
        """All masks as bool [N, H, W], largest first."""
        from pycocotools import mask as mask_utils

        decoded = self._coco(mask_utils.decode)  # [H, W, N] uint8, Fortran order
        masks = np.ascontiguousarray(decoded.reshape(self.height, self.width, -1).transpose(2, 0, 1)).astype(bool)
        return masks[self.largest_first()]

    def decode_at_image_size(self) -> np.ndarray:
        """All masks as bool [N, h, w] at the image's size (through ``pixel_rows``/``pixel_cols`` when set), in
        :meth:`largest_first` order."""
        masks = self.decode()
        if self.pixel_rows is not None:
            masks = masks[:, self.pixel_rows[:, None], self.pixel_cols[None, :]]
        return masks

    def decode_columns(self, indices: np.ndarray, col_start: int, col_stop: int) -> np.ndarray:
        """Masks ``indices``, columns ``col_start:col_stop`` of the image only: uint8 [n, h, col_stop - col_start]
        (a transposed view of the column-major decode). ``h`` and the columns are the image's: with
        ``pixel_rows``/``pixel_cols`` set (a mask resized at read time) only the pixels they pick are decoded."""
        counts = [self.rles[i]["counts"] for i in indices]
        if self.pixel_rows is None:
            cols, rows = np.arange(col_start, col_stop), None
        else:
            cols, rows = self.pixel_cols[col_start:col_stop], self.pixel_rows
        return decode_rle_grid(counts, self.height, self.width, cols, rows, self.source).transpose(0, 2, 1)


def load_masks(json_path: str | Path, height: int, width: int) -> np.ndarray:
    """The non-crowd masks of one SA-1B JSON as bool [N, H, W], largest first.

    Raises :class:`DataError` naming the file for unreadable JSON, a missing ``annotations`` list, an RLE whose
    size differs from the image's ``height`` × ``width``, or no masks at all.
    """
    return MaskRecord.read(json_path, height, width).decode()


# -- reading samples: the extracted folder, or the tar files as downloaded ---------------------------------------
def downscaled_size(height: int, width: int, factor: float) -> tuple[int, int]:
    """(h, w) of an image resized by ``factor`` (``ovseg masks downscale``'s rounding)."""
    return max(1, round(height * factor)), max(1, round(width * factor))


def downscale_image(image: np.ndarray, factor: float) -> np.ndarray:
    """The image as ``ovseg masks downscale`` resizes it (PIL bilinear, antialiased)."""
    from PIL import Image

    new_h, new_w = downscaled_size(*image.shape[:2], factor)
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR, reducing_gap=None))


def cv2_nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel of ``cv2.resize(..., INTER_NEAREST)`` along one axis (read off cv2 on an
    index ramp): how ``ovseg masks downscale`` resizes masks."""
    import cv2

    ramp = np.arange(n_in, dtype=np.float32)[None, :]
    return cv2.resize(ramp, (n_out, 1), interpolation=cv2.INTER_NEAREST)[0].astype(np.int64)


class SA1BFolder:
    """The extracted layout: ``<name>.jpg`` + ``<name>.json`` pairs anywhere under ``folder``."""

    def __init__(self, folder: str | Path, annotations: bool = True):
        self.folder = Path(folder)
        self.pairs, self.missing = find_pairs(self.folder, require_json=annotations)
        self.annotations = annotations
        if self.missing:
            shown = ", ".join(str(p) for p in self.missing[:5])
            logging.getLogger(__name__).warning(
                "SA-1B: skipping %d image(s) without a mask JSON under %s: %s%s", len(self.missing), self.folder,
                shown, " ..." if len(self.missing) > 5 else "")
        #: samples left out when indexing (images without their JSON)
        self.left_out = len(self.missing)

    def __len__(self) -> int:
        return len(self.pairs)

    def limit(self, count: int | None) -> None:
        self.pairs = self.pairs[:count]

    @functools.cached_property
    def _fingerprint(self) -> str:  # once: every checkpoint records it, SA-1B has 22 M files
        return files_fingerprint((p for pair in self.pairs for p in pair if p is not None), self.folder)

    def fingerprint(self) -> str:
        """:func:`~ovseg.data.files.files_fingerprint` of the pairs (as indexed when the run started)."""
        return self._fingerprint

    def where(self, index: int) -> str:
        return str(self.pairs[index][0])

    def read(self, index: int) -> tuple[np.ndarray, MaskRecord | None]:
        image_path, json_path = self.pairs[index]
        image = read_image(image_path)
        return image, MaskRecord.read(json_path, *image.shape[:2]) if self.annotations else None


class _OpenShards:
    """Open shard descriptors of one process, the least recently used closed beyond ``capacity``."""

    def __init__(self, capacity: int):
        from collections import OrderedDict

        self.capacity, self.fds = capacity, OrderedDict()

    def get(self, path: Path, key: int) -> int:
        fd = self.fds.pop(key, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
        self.fds[key] = fd  # most recent last
        while len(self.fds) > self.capacity:
            os.close(self.fds.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.popitem()[1])


TAR_INDEX_VERSION = 1
#: open shard files kept per process (SA-1B has 1,000 tars; a process may hold ~1,024 descriptors)
MAX_OPEN_SHARDS = 64


class SA1BTars:
    """SA-1B as downloaded: ``sa_000000.tar`` … under ``folder``, each holding ``sa_N.jpg`` + ``sa_N.json`` (the
    WebDataset layout), read in place — no extraction.

    Each tar is indexed once (member offsets, with ``wids``' memory-mapped tar indexer; kept in ``index_dir`` when
    given, keyed by the tar's size and mtime) and samples are read by offset, so any sample order costs the same.
    A JSON without its image (or, with annotations, an image without its JSON) is left out and logged with its
    shard and member; a member cut off by a truncated tar is left out the same way; a tar that cannot be indexed
    raises :class:`DataError` naming it, or with ``skip_bad`` is left out and logged.
    """

    def __init__(self, folder: str | Path, annotations: bool = True, index_dir: str | Path | None = None,
                 skip_bad: bool = True):
        log = logging.getLogger(__name__)
        self._files = _OpenShards(MAX_OPEN_SHARDS)
        self.folder, self.annotations = Path(folder), annotations
        self.shards = sorted(p for p in self.folder.rglob("*.tar") if p.is_file())
        if not self.shards:
            raise DataError(f"SA-1B: no .tar files under {self.folder}")
        refuse_copies(self.shards, "tar")
        index_dir = Path(index_dir) if index_dir is not None else None
        columns: dict[str, list[np.ndarray]] = {k: [] for k in ("shard", "image_at", "image_size", "json_at",
                                                               "json_size")}
        self.broken_shards: list[str] = []
        self.left_out = 0
        for shard_id, shard in enumerate(self.shards):
            try:
                index = self._index(shard, index_dir)
            except DataError as e:
                if not skip_bad:
                    raise
                log.warning("SA-1B: skipping shard %s: %s", shard, e)
                self.broken_shards.append(str(shard))
                continue
            for problem in index["problems"]:
                log.warning("SA-1B: %s: %s", shard, problem)
            self.left_out += len(index["problems"])
            keep = index["json_at"] >= 0 if annotations else np.ones(len(index["image_at"]), bool)
            if not keep.all():
                log.warning("SA-1B: %s: %d image(s) without a mask JSON; left out", shard, int((~keep).sum()))
                self.left_out += int((~keep).sum())
            columns["shard"].append(np.full(int(keep.sum()), shard_id, np.int32))
            for key in ("image_at", "image_size", "json_at", "json_size"):
                columns[key].append(index[key][keep])
        self.index = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in columns.items()}

    def __len__(self) -> int:
        return len(self.index["shard"])

    def limit(self, count: int | None) -> None:
        self.index = {k: v[:count] for k, v in self.index.items()}

    def fingerprint(self) -> str:
        """:func:`~ovseg.data.files.files_fingerprint` of the tars, with the number of samples used."""
        return f"{len(self)}:{files_fingerprint(self.shards, self.folder)}"

    @staticmethod
    def _index(shard: Path, index_dir: Path | None) -> dict[str, Any]:
        """Member offsets of one tar: per sample (in tar order) image/JSON data offset and size (-1: absent)."""
        stat = shard.stat()
        cached = None
        if index_dir is not None:
            cached = index_dir / f"{shard.stem}.{stat.st_size}.{int(stat.st_mtime)}.v{TAR_INDEX_VERSION}.npz"
            if cached.is_file():
                with np.load(cached) as data:
                    return {k: (list(data[k]) if k == "problems" else data[k]) for k in data.files}
        try:
            from wids.wids import group_by_key, splitname
            from wids.wids_mmtar import MMIndexedTar
        except ImportError:
            raise ImportError("reading SA-1B tar files needs wids (the WebDataset project's indexed tar reader): "
                              "pip install 'ovseg[tar]'") from None

        try:
            with open(shard, "rb") as stream:
                tar = MMIndexedTar(stream)
                members = list(tar.by_index)
                tar.close()
        except Exception as e:  # wids raises struct/Value/Unicode errors on a cut or garbled header
            raise DataError(f"{shard}: cannot index the tar ({type(e).__name__}: {e}); truncated or corrupt?") \
                from None
        index: dict[str, list] = {k: [] for k in ("image_at", "image_size", "json_at", "json_size")}
        problems = []
        for group in group_by_key([name for name, _, _ in members]):
            found: dict[str, tuple[int, int]] = {}
            for i in group:
                name, offset, size = members[i]
                ext = splitname(name)[1].lower()
                if offset + 512 + size > stat.st_size:
                    problems.append(f"member {name} is cut off (tar truncated); left out")
                    continue
                if ext in IMAGE_SUFFIXES:
                    found["image"] = (offset + 512, size)
                elif ext == ".json":
                    found["json"] = (offset + 512, size)
            key = splitname(members[group[0]][0])[0]
            if "image" not in found:
                if "json" in found:
                    problems.append(f"member {key}.json has no image; left out")
                continue
            image_at, image_size = found["image"]
            json_at, json_size = found.get("json", (-1, -1))
            index["image_at"].append(image_at)
            index["image_size"].append(image_size)
            index["json_at"].append(json_at)
            index["json_size"].append(json_size)
        out: dict[str, Any] = {k: np.asarray(v, dtype=np.int64) for k, v in index.items()}
        out["problems"] = problems
        if cached is not None:
            with atomic_open(cached, "wb") as f:
                np.savez(f, **{k: v for k, v in out.items() if k != "problems"},
                         problems=np.asarray(problems, dtype=str))
        return out

    def _read(self, shard_id: int, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of a shard (the last ``MAX_OPEN_SHARDS`` shards stay open per process)."""
        fd = self._files.get(self.shards[shard_id], shard_id)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise DataError(f"{self.where_at(shard_id, offset)}: {len(data)} of {size} bytes left in the tar")
        return data

    def where_at(self, shard_id: int, data_offset: int) -> str:
        """"<shard>:<member name>" of the member whose data starts at ``data_offset`` (its header, read through the
        shard's open descriptor: names are not kept in memory, SA-1B has 11 M of them)."""
        from wids.wids_mmtar import parse_tar_header

        fd = self._files.get(self.shards[shard_id], shard_id)
        header = os.pread(fd, 500, data_offset - 512)
        name = parse_tar_header(header).name.decode("utf-8", "replace").strip("\x00")
        return f"{self.shards[shard_id]}:{name}"

    def where(self, index: int) -> str:
        return self.where_at(int(self.index["shard"][index]), int(self.index["image_at"][index]))

    def read(self, index: int) -> tuple[np.ndarray, MaskRecord | None]:
        shard = int(self.index["shard"][index])
        image_at = int(self.index["image_at"][index])
        image = read_image(io.BytesIO(self._read(shard, image_at, int(self.index["image_size"][index]))),
                           name=self.where_at(shard, image_at))
        if not self.annotations:
            return image, None
        json_at = int(self.index["json_at"][index])
        data = self._read(shard, json_at, int(self.index["json_size"][index]))
        return image, MaskRecord.parse(data, *image.shape[:2], self.where_at(shard, json_at))

    def __getstate__(self) -> dict[str, Any]:  # spawned loader workers open their own files
        return {k: v for k, v in self.__dict__.items() if k != "_files"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._files = _OpenShards(MAX_OPEN_SHARDS)

    def close(self) -> None:
        self._files.close()


# -- synthetic data (tests, demo) -----------------------------------------------------------------------------------
def write_synthetic_sa1b(folder: str | Path, num_images: int = 4, size: tuple[int, int] = (48, 64),
                         masks_per_image: tuple[int, int] = (3, 6), seed: int = 0, images_per_tar: int = 2,
                         full_cover: bool = False, mask_extent: tuple[float, float] | None = None) -> list[Path]:
    """Images and SA-1B JSONs (COCO RLE via pycocotools) in the extracted-tar layout
    ``sa_00000k/sa_N.jpg`` + ``sa_N.json``. Masks are rectangles and ellipses (they may overlap), half-sides 1/8 to
    1/2 of the image side, or drawn log-uniformly from ``mask_extent`` × the side (SA-1B's many small masks);
    with ``full_cover`` one extra mask covers what the others leave. Returns the image paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width]
    written = []
    for n in range(num_images):
        sub = folder / f"sa_{n // images_per_tar:06d}"
        image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        masks = []
        for _ in range(int(rng.integers(masks_per_image[0], masks_per_image[1] + 1))):
            cy, cx = rng.integers(0, height), rng.integers(0, width)
            if mask_extent is None:
                ry, rx = rng.integers(height // 8 + 1, height // 2 + 1), rng.integers(width // 8 + 1, width // 2 + 1)
            else:
                ry, rx = (int(side * np.exp(rng.uniform(*np.log(mask_extent)))) + 1 for side in (height, width))
            if rng.random() < 0.5:
                mask = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
            else:
                mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            masks.append(mask)
            image[mask] = (image[mask] // 4 + rng.integers(0, 192, 3)).astype(np.uint8)
        if full_cover:
            rest = ~np.any(masks, axis=0)
            if rest.any():
                masks.append(rest)
        image_path = sub / f"sa_{n + 1}.jpg"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(image_path, "wb") as f:
            Image.fromarray(image).save(f, format="JPEG", quality=95)
        annotations = []
        for i, mask in enumerate(masks):
            ys, xs = np.nonzero(mask)
            annotations.append({
                "id": i, "segmentation": encode_mask(mask), "area": int(mask.sum()),
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
                "predicted_iou": 0.9, "stability_score": 0.95, "crop_box": [0, 0, width, height],
                "point_coords": [[float(xs.mean()), float(ys.mean())]],
            })
        record = {"image": {"image_id": n + 1, "width": width, "height": height, "file_name": image_path.name},
                  "annotations": annotations}
        with atomic_open(image_path.with_suffix(".json"), "w", encoding="utf-8") as f:
            json.dump(record, f)
        written.append(image_path)
    return written


def write_sa1b_tars(folder: str | Path, out: str | Path) -> list[Path]:
    """Pack an extracted SA-1B folder (``sa_XXXXXX/sa_N.jpg`` + ``.json``) into one tar per subfolder, as SA-1B
    is downloaded (``sa_XXXXXX.tar``; members in name order, image before JSON). Returns the tar paths."""
    import tarfile

    folder, out = Path(folder), Path(out)
    written = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        path = out / f"{sub.name}.tar"
        with atomic_open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for member in sorted(sub.iterdir(), key=lambda p: (p.stem, p.suffix != ".jpg")):
                tar.add(member, arcname=member.name)
        written.append(path)
    return written
