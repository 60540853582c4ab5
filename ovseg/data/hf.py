"""A user's own labelled set (or a Hub copy of one) as an evaluation dataset, through HF ``datasets``.

One config entry in ``data.datasets`` describes it::

    - {name: mydata, hf: {path: imagefolder, data_dir: my_set}, split: validation,
       class_names: my_set/classes.txt, image_column: image, mask_column: mask,
       reduce_zero_label: false, background_index: null}
    - {name: hubset, hf: {path: someuser/some-seg-dataset}, split: validation, class_names: "cat,dog,sky"}
    - {name: pq, hf: {path: parquet, data_files: {validation: data/*.parquet}}, split: validation,
       class_names: names.txt}

``hf`` is passed to :func:`datasets.load_dataset`; relative ``data_dir`` / ``data_files`` paths that do
not exist as given are looked up under the data root. For ``imagefolder``, a ``metadata.csv`` (or
``.jsonl``) next to the images with ``file_name,mask_file_name`` columns pairs each image with its mask
(every ``<x>_file_name`` column becomes an image column ``<x>``). Masks are index PNGs (mode ``L``,
``P``, ``I``): palette indices, never RGB colours. Samples are the same dicts as
:class:`~ovseg.data.seg_dataset.SegFileDataset`'s, with the same label conventions
(``reduce_zero_label`` as in mmseg, 255 = ignore).

``datasets`` is an optional dependency (``pip install ovseg[hf]``); it is imported only here.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ovseg.data.classnames import looks_like_class_file, parse_class_list, read_class_names
from ovseg.data.seg_dataset import DataError, values_outside_classes
from ovseg.data.specs import DatasetSpec

#: keys an entry may hold (anything else is a typo and is reported).
ENTRY_KEYS = (
    "name", "hf", "split", "class_names", "image_column", "mask_column", "id_column",
    "reduce_zero_label", "background_index",
)
#: columns tried, in order, when ``mask_column`` is not given.
MASK_COLUMN_CANDIDATES = ("mask", "label", "annotation", "segmentation", "semantic_map", "seg_map", "gt")
#: ``load_dataset`` builders that read local files (their ``path`` is not a Hub name).
PACKAGED_BUILDERS = ("imagefolder", "parquet", "arrow", "csv", "json", "webdataset", "text")
LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "1")


def _import_datasets():
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "a dataset entry given as a dict is read with Hugging Face `datasets`, which is not installed: "
            "pip install ovseg[hf]"
        ) from e
    return datasets


# -- paths ----------------------------------------------------------------------------------------
def _exists(pattern: str) -> bool:
    return Path(pattern).exists() or (glob.has_magic(pattern) and bool(glob.glob(pattern, recursive=True)))


def _resolve(value: str, root: Path) -> str:
    """``value`` as given if it exists (or a glob matches), else under ``root`` if it exists there."""
    if _exists(value) or Path(value).is_absolute() or "://" in value:
        return value
    under_root = str(root / value)
    return under_root if _exists(under_root) else value


def _resolve_data_files(data_files: Any, root: Path) -> Any:
    if isinstance(data_files, str):
        return _resolve(data_files, root)
    if isinstance(data_files, (list, tuple)):
        return [_resolve_data_files(f, root) for f in data_files]
    if isinstance(data_files, dict):
        return {split: _resolve_data_files(f, root) for split, f in data_files.items()}
    return data_files


def resolve_hf_kwargs(hf: dict[str, Any], root: str | Path) -> dict[str, Any]:
    """``hf`` with relative ``data_dir`` / ``data_files`` (and a local ``path``) resolved against ``root``."""
    root = Path(root)
    kwargs = dict(hf)
    if isinstance(kwargs.get("data_dir"), str):
        kwargs["data_dir"] = _resolve(kwargs["data_dir"], root)
    if "data_files" in kwargs:
        kwargs["data_files"] = _resolve_data_files(kwargs["data_files"], root)
    path = kwargs.get("path")
    if isinstance(path, str) and path not in PACKAGED_BUILDERS and not Path(path).exists() and (root / path).exists():
        kwargs["path"] = str(root / path)
    return kwargs


def entry_files(entry: dict[str, Any], root: str | Path) -> list[Path]:
    """The local files a dict entry reads: its class-name file and every file of its ``data_dir``, ``data_files``
    (globs expanded) and local ``path``, as :func:`build_hf_dataset` resolves them (Hub datasets have none)."""
    root = Path(root)
    named: list[str] = []
    class_names = entry.get("class_names")
    if isinstance(class_names, str):
        named += [str(c) for c in (Path(class_names), root / class_names) if c.is_file()][:1]
    hf = resolve_hf_kwargs(entry.get("hf") or {}, root)
    for key in ("data_dir", "path"):
        if isinstance(hf.get(key), str) and hf[key] not in PACKAGED_BUILDERS:
            named.append(hf[key])
    stack = [hf.get("data_files")]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            named += glob.glob(value, recursive=True) if glob.has_magic(value) else [value]
        elif isinstance(value, dict):
            stack += list(value.values())
        elif isinstance(value, (list, tuple)):
            stack += list(value)
    files = set()
    for name in named:
        path = Path(name)
        if path.is_file():
            files.add(path)
        elif path.is_dir():
            files.update(p for p in path.rglob("*") if p.is_file())
    return sorted(files)


def entry_fingerprint(entry: dict[str, Any], root: str | Path) -> str:
    """A cheap identity of a dict entry and its local files (:func:`entry_files`: paths, sizes, modification times,
    as :func:`~ovseg.data.seg_dataset.split_fingerprint`): a mask or class-name file changed changes it."""
    digest = hashlib.sha256(json.dumps(entry, sort_keys=True, default=str).encode())
    root = Path(root)
    for path in entry_files(entry, root):
        stat = path.stat()
        where = path.relative_to(root) if path.is_relative_to(root) else path  # the same files under another root
        digest.update(f"|{where}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _is_hub_name(path: str) -> bool:
    return path not in PACKAGED_BUILDERS and not Path(path).exists()


# -- loading --------------------------------------------------------------------------------------
def _load(name: str, hf: dict[str, Any], split: str | None):
    datasets = _import_datasets()
    path = hf.get("path")
    if not isinstance(path, str) or not path:
        raise ValueError(
            f"dataset {name!r}: `hf` needs `path` (a builder such as imagefolder or parquet, a local folder, "
            f"or a Hub dataset name), got {hf}"
        )
    try:
        ds = datasets.load_dataset(**hf, split=split) if split is not None else datasets.load_dataset(**hf)
    except ImportError:
        raise
    except Exception as e:
        where = f"Hugging Face dataset {path!r}"
        for key in ("data_dir", "data_files"):
            if key in hf:
                where += f" ({key}={hf[key]!r})"
        msg = f"dataset {name!r}: cannot load {where}: {type(e).__name__}: {e}"
        if e.__cause__ is not None:  # DatasetGenerationError hides the real problem in its cause
            msg += f" ({type(e.__cause__).__name__}: {e.__cause__})"
        msg = msg.rstrip(". ")
        if _is_hub_name(path) and "Unknown split" not in str(e):
            msg += (
                ". It looks like a Hub name: with HF_HUB_OFFLINE=1 (or no network) it loads only from the "
                "local cache (HF_DATASETS_CACHE / HF_HUB_CACHE); download it once online, or point `hf` at a "
                "local copy (path: imagefolder + data_dir, or parquet + data_files)"
            )
        elif "Unknown split" in str(e) and path in ("imagefolder", "parquet", "csv", "json", "arrow"):
            msg += (
                ". A folder without train/validation/test subfolders (or data_files given as one list) is all "
                "'train': set `split: train`, or give data_files as {split_name: pattern}"
            )
        raise DataError(msg) from e
    if split is None:
        if isinstance(ds, datasets.DatasetDict):
            if len(ds) != 1:
                raise DataError(f"dataset {name!r}: it has splits {sorted(ds)}; choose one with `split:`")
            ds = next(iter(ds.values()))
    if isinstance(ds, datasets.IterableDataset) or isinstance(ds, datasets.IterableDatasetDict):
        raise DataError(f"dataset {name!r}: streaming datasets are not supported for evaluation; drop `streaming`")
    return ds


def _choose_column(name: str, ds, column: str | None, what: str, candidates: tuple[str, ...]) -> str:
    available = list(ds.column_names)
    if column is not None:
        if column not in available:
            raise DataError(
                f"dataset {name!r}: {what} column {column!r} not found; available columns: {available} "
                f"(set `{what}_column:`)"
            )
        return column
    for c in candidates:
        if c in available:
            return c
    raise DataError(
        f"dataset {name!r}: no {what} column (tried {list(candidates)}); available columns: {available} "
        f"(set `{what}_column:`)"
    )


def _undecoded(ds, column: str):
    """Make ``column`` yield ``{path, bytes}`` dicts (decoded here) when it holds images, paths or bytes."""
    datasets = _import_datasets()
    feature = ds.features[column]
    if isinstance(feature, datasets.Image):
        return ds.cast_column(column, datasets.Image(decode=False)) if feature.decode else ds
    if isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary", "string", "large_string"):
        return ds.cast_column(column, datasets.Image(decode=False))
    if isinstance(feature, dict) and {"bytes", "path"} <= set(feature):
        return ds.cast_column(column, datasets.Image(decode=False))
    return ds  # arrays (Array2D, nested lists) are read with np.asarray


# -- the dataset ----------------------------------------------------------------------------------
class HFSegDataset(Dataset):
    """Image/mask pairs from a Hugging Face dataset, with :class:`SegFileDataset`'s interface."""

    def __init__(
        self,
        hf_dataset,
        name: str,
        class_names: list[list[str]],
        image_column: str = "image",
        mask_column: str = "mask",
        id_column: str | None = None,
        reduce_zero_label: bool = False,
        background_index: int | None = None,
        limit: int | None = None,
    ):
        self.name = name
        self.class_names = [list(c) for c in class_names]
        self.num_classes = len(self.class_names)
        if background_index is not None and not 0 <= background_index < self.num_classes:
            raise ValueError(
                f"dataset {name!r}: background_index {background_index} outside its {self.num_classes} classes"
            )
        self.background_index = background_index
        self.reduce_zero_label = bool(reduce_zero_label)
        # the label convention is a DatasetSpec's (one implementation of reduce_zero_label)
        self.spec = DatasetSpec(
            name, img_dir="", ann_dir="", img_suffix="", seg_suffix="",
            reduce_zero_label=self.reduce_zero_label, background_index=background_index,
        )
        self.ignore_index = self.spec.ignore_index
        self.image_column = image_column
        self.mask_column = mask_column
        self.id_column = id_column
        columns = [image_column, mask_column]
        if id_column and id_column not in columns:
            columns.append(id_column)
        ds = hf_dataset.select_columns(columns)
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        for column in (image_column, mask_column):
            try:
                ds = _undecoded(ds, column)
            except Exception as e:  # noqa: BLE001 - report the column and its type
                raise DataError(
                    f"dataset {name!r}: column {column!r} of type {hf_dataset.features[column]} cannot be read as "
                    f"an image ({e})"
                ) from e
        self.data = ds

    def __len__(self) -> int:
        return len(self.data)

    # -- decoding ---------------------------------------------------------------------------------
    def _where(self, index: int, value: Any = None) -> str:
        where = f"dataset {self.name!r} row {index}"
        path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
        return f"{where} ({path})" if path else where

    def _open(self, index: int, value: Any, what: str) -> Image.Image:
        try:
            if isinstance(value, Image.Image):
                return value
            if isinstance(value, dict):
                if value.get("bytes") is not None:
                    return Image.open(io.BytesIO(value["bytes"]))
                if value.get("path"):
                    return Image.open(value["path"])
                raise DataError(f"{self._where(index)}: {what} is empty (no bytes, no path)")
            if isinstance(value, (bytes, bytearray)):
                return Image.open(io.BytesIO(value))
            if isinstance(value, str):
                return Image.open(value)
        except FileNotFoundError:
            raise DataError(f"{self._where(index, value)}: {what} file not found") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise DataError(f"{self._where(index, value)}: cannot decode {what} ({e})") from None
        if value is None:
            raise DataError(f"{self._where(index)}: {what} is missing (null)")
        raise DataError(f"{self._where(index)}: cannot read {what} from a {type(value).__name__}")

    def _read_image(self, index: int, value: Any) -> np.ndarray:
        im = self._open(index, value, "image")
        try:
            return np.asarray(im.convert("RGB"))
        except (OSError, SyntaxError) as e:
            raise DataError(f"{self._where(index, value)}: cannot decode image ({e})") from None
        finally:
            im.close()

    def _read_raw_label(self, index: int, value: Any) -> np.ndarray:
        if isinstance(value, (list, np.ndarray)):
            raw = np.asarray(value)
            if raw.ndim != 2 or not np.issubdtype(raw.dtype, np.integer):
                raise DataError(f"{self._where(index)}: mask array must be 2-D integer, got {raw.dtype} {raw.shape}")
            return raw
        im = self._open(index, value, "mask")
        try:
            if im.mode not in LABEL_MODES:
                raise DataError(
                    f"{self._where(index, value)}: mask has mode {im.mode}; expected class indices "
                    f"(a palette 'P' or greyscale 'L'/'I' PNG). An RGB colour mask must be converted to an index "
                    f"PNG first (map each colour to its class id)"
                )
            raw = np.asarray(im)
        except (OSError, SyntaxError) as e:
            raise DataError(f"{self._where(index, value)}: cannot decode mask ({e})") from None
        finally:
            im.close()
        return raw.astype(np.uint8) if raw.dtype == bool else raw

    def _map_and_check(self, index: int, raw: np.ndarray, value: Any) -> np.ndarray:
        label = self.spec.map_label(raw)
        values = values_outside_classes(label, self.num_classes, self.ignore_index)
        if values:
            raise DataError(
                f"{self._where(index, value)}: mask values {values} outside the {self.num_classes} classes of "
                f"{self.name!r} (after reduce_zero_label={self.reduce_zero_label}; 255 = ignore)"
            )
        return label

    # -- interface --------------------------------------------------------------------------------
    def load_label(self, index: int) -> np.ndarray:
        """The mapped label of row ``index`` (int64 ``[H,W]``, 255 = ignore), validated against the classes."""
        value = self.data[index][self.mask_column]
        return self._map_and_check(index, self._read_raw_label(index, value), value)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.data):
            raise IndexError(f"dataset {self.name!r}: row {index} out of range ({len(self.data)} rows)")
        row = self.data[index]
        image_value, mask_value = row[self.image_column], row[self.mask_column]
        image = self._read_image(index, image_value)
        label = self._map_and_check(index, self._read_raw_label(index, mask_value), mask_value)
        if label.shape != image.shape[:2]:
            raise DataError(
                f"{self._where(index, mask_value)}: mask size {label.shape[1]}x{label.shape[0]} differs from its "
                f"image{self._path_suffix(image_value)} ({image.shape[1]}x{image.shape[0]})"
            )
        image_path = image_value.get("path") if isinstance(image_value, dict) else None
        if self.id_column is not None:
            file_id = str(row[self.id_column])
        elif image_path:
            file_id = Path(image_path).stem
        else:
            file_id = str(index)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "label": torch.from_numpy(label),
            "meta": {"dataset": self.name, "id": file_id, "image_path": str(image_path or ""), "index": index},
        }

    @staticmethod
    def _path_suffix(value: Any) -> str:
        path = value.get("path") if isinstance(value, dict) else None
        return f" {path}" if path else ""

    def __repr__(self) -> str:
        return f"HFSegDataset(name={self.name!r}, rows={len(self)}, num_classes={self.num_classes})"


def _class_names(name: str, value: Any, root: Path) -> list[list[str]]:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(
            f"dataset {name!r}: `class_names` is required: a class-name file (one class per line, synonyms "
            f"comma-separated; relative to the data root allowed), a shipped name such as 'voc21', or an "
            f"inline list 'cat,dog,sky'"
        )
    if isinstance(value, (list, tuple)):
        classes = [[s] if isinstance(s, str) else [str(x) for x in s] for s in value]
        if not classes:
            raise ValueError(f"dataset {name!r}: `class_names` is empty")
        return classes
    text = str(value)
    for candidate in (Path(text), root / text):
        if candidate.is_file():
            return read_class_names(candidate)
    try:
        return read_class_names(text)  # a shipped name
    except FileNotFoundError:
        pass
    if looks_like_class_file(text):
        raise FileNotFoundError(
            f"dataset {name!r}: class-name file {text!r} not found (as given, or under the data root {root})"
        )
    return parse_class_list(text)


def build_hf_dataset(entry: dict[str, Any], root: str | Path = ".", limit: int | None = None) -> HFSegDataset:
    """An evaluation dataset from one ``data.datasets`` dict entry (see the module docstring)."""
    entry = dict(entry)
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise ValueError(f"dataset entry {entry}: unknown keys {unknown}; allowed: {list(ENTRY_KEYS)}")
    hf = entry.get("hf")
    if not isinstance(hf, dict):
        raise ValueError(
            f"dataset entry {entry}: needs `hf: {{path: ...}}`, the arguments of datasets.load_dataset "
            f"(e.g. {{path: imagefolder, data_dir: my_set}})"
        )
    root = Path(root)
    name = entry.get("name")
    if not name:
        raise ValueError(f"dataset entry {entry}: needs a `name` (used in metric names and logs)")
    class_names = _class_names(name, entry.get("class_names"), root)
    hf = resolve_hf_kwargs(hf, root)
    data_dir = hf.get("data_dir")
    if isinstance(data_dir, str) and "://" not in data_dir and not Path(data_dir).exists():
        raise DataError(f"dataset {name!r}: data_dir {data_dir!r} not found (as given, or under the data root {root})")
    ds = _load(name, hf, entry.get("split"))
    image_column = _choose_column(name, ds, entry.get("image_column"), "image", ("image", "img", "pixel_values"))
    mask_column = _choose_column(name, ds, entry.get("mask_column"), "mask", MASK_COLUMN_CANDIDATES)
    id_column = entry.get("id_column")
    if id_column is not None:
        _choose_column(name, ds, id_column, "id", ())
    return HFSegDataset(
        ds,
        name=name,
        class_names=class_names,
        image_column=image_column,
        mask_column=mask_column,
        id_column=id_column,
        reduce_zero_label=bool(entry.get("reduce_zero_label", False)),
        background_index=entry.get("background_index"),
        limit=limit,
    )
