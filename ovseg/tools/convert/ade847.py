"""ADE20K-847 from the ADE20K full release (``ADE20K_2021_17_01``), as CAT-Seg's ``datasets/prepare_ade20k_full.py``.

Input, under ROOT (CAT-Seg's ``DETECTRON2_DATASETS``): ``ADE20K_2021_17_01/index_ade20k.pkl`` (a dict whose lists
``folder`` and ``filename`` name every image; folders are relative to ROOT) and each image ``<name>.jpg`` beside its
``<name>_seg.png``. For every validation image (``filename.split("_")[1] == "val"``, as theirs):

- ADE class index of each pixel = ``int(R / 10) * 256 + G`` of ``<name>_seg.png`` (their ``loadAde20K``);
- a short side above 512 is shrunk to 512 (long side ``round(long / short * 512)``): the image with cv2
  ``INTER_LINEAR``, the class map with ``INTER_NEAREST``;
- the 847 ADE class ids of CAT-Seg's table -> train ids 0..846 (``ADE847_ADE_IDS[i] -> i``); every other id (0 =
  unlabelled, ADE's other classes) -> 65535, the ignore value of ``register_ade20k_847.py``.

Output: ``ADE20K_2021_17_01/images_detectron2/validation/<name>.jpg`` (PIL's JPEG at its default quality, as theirs
saves it) and ``ADE20K_2021_17_01/annotations_detectron2/validation/<name>.tif`` (uint16 TIFF). Only the validation
split is converted (theirs skips training: ADE-847 is a test set).
"""

from __future__ import annotations

import argparse
import io
import pickle
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ovseg.data.specs import WIDE_IGNORE_INDEX, get_spec
from ovseg.tools.convert._common import ConversionError, add_common_args, print_summary, run_parallel, split_todo
from ovseg.utils.io import atomic_open, atomic_save_tiff, numpy_safe_globals

NAME = "ade847"
FOLDER = "ADE20K_2021_17_01"
#: short side of the converted images and labels (prepare_ade20k_full.py ``max_size``)
MAX_SIZE = 512

#: ADE20K full class ids of the 847 classes in train-id order (CAT-Seg register_ade20k_847.py
#: ``ADE20K_SEM_SEG_FULL_CATEGORIES``: ``id`` of the entry whose ``trainId`` is i; the names are classnames/ade847.txt)
ADE847_ADE_IDS = (
    2978, 312, 2420, 2855, 2131, 976, 447, 165, 2377, 838, 350, 1831, 1125, 3055, 401, 1610, 1910, 2684, 471, 687,
    774, 2473, 2264, 1735, 2994, 1564, 1276, 2178, 2329, 57, 907, 913, 1395, 2138, 2272, 2128, 724, 155, 2053, 2380,
    689, 1788, 3087, 2530, 581, 2388, 2985, 2454, 2096, 137, 294, 212, 2185, 524, 2212, 943, 1869, 2251, 2793, 2423,
    1121, 266, 1948, 1744, 783, 571, 627, 629, 491, 1374, 223, 3016, 2598, 978, 239, 608, 236, 2531, 2616, 591, 327,
    2679, 1451, 181, 420, 2821, 1023, 855, 2733, 2928, 1240, 77, 1969, 2880, 14, 1936, 2828, 631, 103, 3144, 308,
    1282, 38, 1563, 29, 480, 2569, 247, 187, 778, 2243, 1941, 2833, 120, 95, 2836, 1087, 868, 1401, 220, 47, 843,
    123, 2537, 1927, 2337, 1702, 64, 249, 642, 1981, 609, 2840, 2586, 1393, 2704, 1304, 146, 1494, 2739, 389, 1551,
    131, 738, 161, 747, 1919, 3109, 2179, 2989, 206, 1930, 1002, 2254, 1708, 2526, 160, 2901, 2262, 44, 597, 2235,
    1260, 682, 2151, 3107, 432, 1098, 2932, 461, 410, 2046, 533, 1481, 1858, 894, 1322, 1891, 1756, 49, 1272, 1229,
    2850, 1784, 2962, 259, 319, 954, 1974, 1013, 2356, 97, 318, 592, 2885, 1017, 851, 1407, 1332, 303, 2714, 1924,
    1346, 1081, 1583, 2727, 2509, 2123, 602, 202, 10, 490, 530, 2213, 1884, 2934, 2687, 387, 2668, 982, 2547, 1474,
    877, 1391, 414, 698, 2019, 2422, 3010, 1139, 753, 1747, 2175, 1301, 1033, 1789, 2939, 2730, 1652, 90, 1349, 2830,
    1485, 2370, 2155, 118, 1402, 1957, 3130, 1197, 52, 2688, 96, 762, 772, 1857, 2315, 1016, 643, 3105, 1849, 791,
    349, 6, 3114, 1587, 1233, 559, 1223, 3049, 1943, 853, 709, 1390, 2748, 2007, 1546, 1513, 2600, 2538, 1790, 194,
    326, 2877, 594, 2036, 1662, 2366, 1754, 418, 2553, 1951, 1963, 918, 2086, 997, 2731, 704, 1365, 569, 3108, 948,
    839, 63, 1305, 378, 2362, 2734, 2982, 2398, 1119, 382, 1141, 1805, 3102, 2341, 1131, 2316, 2626, 3104, 198, 1896,
    2800, 190, 3131, 1463, 357, 929, 209, 912, 1164, 1509, 2539, 3116, 2615, 1644, 818, 242, 2217, 2347, 2686, 2300,
    572, 789, 358, 2443, 101, 2969, 2692, 606, 2339, 1533, 2060, 1782, 495, 371, 2707, 889, 3156, 2683, 1499, 1135,
    1619, 125, 2838, 2792, 1695, 746, 1343, 1370, 2858, 145, 2565, 1892, 1103, 286, 170, 3073, 922, 1655, 1602, 2160,
    1151, 2176, 2239, 132, 394, 1424, 607, 700, 116, 1425, 2676, 141, 2360, 2449, 897, 317, 2228, 2351, 1543, 656,
    1088, 373, 2472, 2892, 1740, 3067, 1367, 188, 79, 1633, 1885, 677, 1779, 1297, 2334, 3027, 2735, 1791, 2405,
    1748, 2983, 3035, 2824, 2168, 385, 2148, 2465, 175, 390, 268, 2722, 2857, 3088, 2926, 2782, 1378, 1934, 2072,
    2889, 944, 1158, 1383, 867, 2145, 1915, 361, 402, 482, 2761, 300, 1554, 636, 260, 1186, 871, 2859, 2103, 208,
    2236, 2012, 2462, 1462, 2832, 2617, 1024, 1129, 18, 376, 134, 407, 434, 2017, 2717, 2005, 2993, 1545, 1445, 2831,
    1161, 2411, 2949, 1769, 552, 2327, 939, 3013, 1986, 1486, 2723, 1549, 2649, 1020, 392, 422, 1419, 2099, 2464,
    3058, 430, 675, 2941, 2955, 2355, 840, 32, 2338, 1232, 2834, 2991, 2879, 444, 1657, 2246, 296, 245, 2661, 1202,
    1714, 251, 1095, 1828, 311, 2732, 947, 2115, 2738, 2525, 2194, 634, 740, 2682, 2020, 1156, 1036, 1295, 1181,
    3037, 1614, 736, 893, 2047, 1274, 1361, 3036, 2606, 2797, 2022, 2876, 2758, 472, 3028, 882, 1189, 743, 3122,
    2401, 468, 1061, 1523, 3059, 2843, 2853, 1529, 214, 3032, 3071, 277, 813, 426, 1039, 727, 1508, 2490, 2299, 768,
    1172, 537, 1847, 1664, 1110, 1014, 662, 121, 227, 2410, 2165, 2696, 3005, 1231, 635, 292, 2690, 65, 2607, 2574,
    1188, 456, 2913, 459, 1955, 827, 1111, 2412, 2997, 528, 366, 1863, 500, 1001, 1958, 1441, 809, 210, 435, 718,
    1674, 388, 1572, 1584, 1944, 674, 99, 2352, 1019, 1763, 185, 554, 1066, 2508, 951, 2822, 415, 297, 1914, 2619,
    1338, 2505, 955, 2786, 238, 3000, 2763, 299, 822, 1288, 3101, 2894, 992, 489, 2157, 2309, 1576, 1810, 2964, 2662,
    2087, 1569, 503, 1505, 1468, 1613, 1138, 1256, 2715, 2846, 477, 2576, 108, 2245, 1162, 2149, 2183, 858, 1324,
    1055, 1741, 149, 615, 825, 2143, 304, 283, 2322, 3017, 2510, 1960, 265, 2282, 2184, 1461, 3113, 2372, 2166, 232,
    693, 1945, 3039, 2494, 1908, 2827, 280, 2950, 1044, 288, 2863, 1342, 2409, 1258, 2249, 2862, 920, 1607, 2802,
    610, 3129, 1108, 2823, 476, 2641, 2788, 2070, 1368, 2903, 699, 2844, 942, 2663, 457, 2701, 2540, 2231, 2746,
    1738, 2350, 2808, 2025, 2541, 2156, 126, 2512, 831, 2503, 2039, 2774, 886, 919, 2240, 2636, 963, 1218, 1406,
    1420, 526, 2639, 975, 1921, 2305, 1193, 2517, 2809, 1647, 314, 2560, 545, 1345, 775, 603, 1163, 1641, 1678, 2450,
    2915, 42, 2242, 2741, 1143, 862, 1654, 1826, 1689, 3124, 2710, 152, 549, 360, 1982, 1478, 2203, 2612, 2956, 2681,
    437, 2171, 1933, 3110, 1824, 2803, 234, 764, 177, 817, 3145, 1262, 864, 2359, 2992, 1725, 2667, 2484, 1133, 1667,
    2847, 932, 1392, 2573, 2140, 1046, 264, 2927, 2752, 679, 2493, 1658, 2466, 1057, 2444, 2093, 2248, 2432, 726,
    816, 1171, 2766, 2900, 2313, 488, 2265, 2043, 332, 1771, 2320, 2646, 1089, 2826, 3148,
)  # fmt: skip


def class_lut() -> np.ndarray:
    """ADE class index -> train id (uint16; 65535 for every index outside the 847)."""
    lut = np.full(max(ADE847_ADE_IDS) + 1, WIDE_IGNORE_INDEX, dtype=np.uint16)
    lut[list(ADE847_ADE_IDS)] = np.arange(len(ADE847_ADE_IDS), dtype=np.uint16)
    return lut


def ade_class_index(seg: np.ndarray) -> np.ndarray:
    """``<name>_seg.png`` (RGB uint8) -> ADE class index per pixel (int32): ``int(R / 10) * 256 + G``."""
    return (seg[..., 0] // 10).astype(np.int32) * 256 + seg[..., 1].astype(np.int32)


def train_ids(class_index: np.ndarray) -> np.ndarray:
    """ADE class indices -> the 847 train ids (uint16, 65535 ignore)."""
    lut = class_lut()
    inside = class_index < len(lut)
    return np.where(inside, lut[np.where(inside, class_index, 0)], WIDE_IGNORE_INDEX).astype(np.uint16)


def resized_size(height: int, width: int, max_size: int = MAX_SIZE) -> tuple[int, int] | None:
    """(height, width) with the short side shrunk to ``max_size``, or None when it is not above it (theirs)."""
    if width >= height > max_size:
        return max_size, round(width / float(height) * max_size)
    if height >= width > max_size:
        return round(height / float(width) * max_size), max_size
    return None


class _IndexUnpickler(pickle.Unpickler):
    """``index_ade20k.pkl`` holds lists, strings and numpy arrays: anything else (code) is refused."""

    allowed = {f"{getattr(obj, '__module__', '')}.{getattr(obj, '__name__', '')}": obj
               for obj in numpy_safe_globals() if not isinstance(obj, tuple)}
    allowed.update({name: obj for obj, name in (o for o in numpy_safe_globals() if isinstance(o, tuple))})

    def find_class(self, module: str, name: str) -> Any:
        for candidate in (f"{module}.{name}", f"{module.replace('numpy.core', 'numpy._core')}.{name}"):
            if candidate in self.allowed:
                return self.allowed[candidate]
        if module == "numpy" and name == "dtype":
            return np.dtype
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def read_index(path: Path) -> list[tuple[str, str]]:
    """``(folder, filename)`` of every image listed in ``index_ade20k.pkl``; a malformed file raises naming it."""
    if not path.is_file():
        raise ConversionError(f"{path}: ADE20K full index not found (expected {FOLDER}/index_ade20k.pkl of the "
                              "ADE20K_2021_17_01 download)")
    try:
        index = _IndexUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise ConversionError(f"{path}: cannot read the ADE20K index ({type(e).__name__}: {e})") from None
    if not isinstance(index, dict) or not all(k in index for k in ("folder", "filename")):
        keys = ", ".join(sorted(map(str, index))) if isinstance(index, dict) else type(index).__name__
        raise ConversionError(f"{path}: expected a dict with 'folder' and 'filename' lists, found {keys}")
    folders, names = list(index["folder"]), list(index["filename"])
    if len(folders) != len(names):
        raise ConversionError(f"{path}: {len(folders)} folders but {len(names)} file names")
    return [(str(f), str(n)) for f, n in zip(folders, names)]


def _read_rgb_array(path: Path, what: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im)
    except FileNotFoundError:
        raise ConversionError(f"{path}: {what} not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ConversionError(f"{path}: cannot decode {what} ({e})") from None


def _convert_one(task: tuple[str, str], root: str) -> str:
    """One validation image: resize as theirs, map the classes, write the JPEG and the TIFF."""
    import cv2

    folder, filename = task
    image_path = Path(root) / folder / filename
    seg_path = image_path.with_name(image_path.name.replace(".jpg", "_seg.png"))
    image = _read_rgb_array(image_path, "image")
    seg = _read_rgb_array(seg_path, "segmentation PNG")
    if seg.ndim != 3 or seg.shape[2] < 3 or seg.dtype != np.uint8:
        raise ConversionError(f"{seg_path}: expected an 8-bit RGB segmentation PNG, got shape {seg.shape} {seg.dtype}")
    if seg.shape[:2] != image.shape[:2]:
        raise ConversionError(f"{seg_path}: size {seg.shape[1]}x{seg.shape[0]} differs from its image "
                              f"{image_path} ({image.shape[1]}x{image.shape[0]})")
    classes = ade_class_index(seg)
    size = resized_size(*image.shape[:2])
    if size is not None:
        image = cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR)
        classes = cv2.resize(classes, size[::-1], interpolation=cv2.INTER_NEAREST)
    out = Path(root) / FOLDER
    with atomic_open(out / "images_detectron2" / "validation" / filename, "wb") as f:
        Image.fromarray(image).save(f, format="JPEG")
    atomic_save_tiff(out / "annotations_detectron2" / "validation" / filename.replace(".jpg", ".tif"),
                     train_ids(classes))
    return filename


def convert_ade847(root: str | Path, nproc: int = 1, overwrite: bool = False) -> dict[str, Any]:
    """Write ADE-847's validation images and labels under ``root/ADE20K_2021_17_01`` (see the module docstring)."""
    root = Path(root)
    entries = read_index(root / FOLDER / "index_ade20k.pkl")
    val = [(folder, name) for folder, name in entries if len(name.split("_")) > 1 and name.split("_")[1] == "val"]
    if not val:
        raise ConversionError(f"{root / FOLDER / 'index_ade20k.pkl'}: lists no validation image (ADE_val_*.jpg)")
    spec = get_spec(NAME)
    label_dir = spec.path(root, spec.ann_dir, "val")
    todo, skipped = split_todo(((t, label_dir / t[1].replace(".jpg", ".tif")) for t in val), overwrite)
    written = run_parallel(partial(_convert_one, root=str(root)), todo, nproc, desc=NAME, unit="img")
    return {"val": len(val), "written": len(written), "skipped": skipped}


def main(args: argparse.Namespace) -> dict[str, Any]:
    summary = convert_ade847(args.root, args.nproc, args.overwrite)
    print_summary(NAME, summary)
    print("  (ADE20K_2021_17_01: val=2000)")
    return summary


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME,
        help="ADE20K-847 (16-bit labels) from the ADE20K full release, as CAT-Seg's prepare_ade20k_full.py",
        description=(
            "Read ROOT/ADE20K_2021_17_01/index_ade20k.pkl, shrink each validation image and its *_seg.png class map "
            "to a short side of 512, map the 847 ADE classes of CAT-Seg's table to 0..846 (others 65535) and write "
            "ROOT/ADE20K_2021_17_01/{images_detectron2,annotations_detectron2}/validation/ (JPEG, uint16 TIFF)."
        ),
    )
    p.add_argument("root", type=Path, help="the folder holding ADE20K_2021_17_01/ (CAT-Seg's DETECTRON2_DATASETS)")
    add_common_args(p)
    p.set_defaults(func=main)
    return p
