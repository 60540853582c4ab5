"""``ovseg data verify``: is each dataset under a root complete and in its label convention?"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ovseg.data.files import EXIF_ORIENTATION
from ovseg.data.seg_dataset import DataError, list_samples, read_label_png
from ovseg.data.specs import get_spec


@dataclass
class VerifyReport:
    dataset: str
    split: str
    found: bool
    num_images: int = 0
    expected: int | None = None
    label_values: list[int] = field(default_factory=list)  # raw values seen in the label PNGs
    #: raw values that mean "ignore" (255; 65535 and PC-459's 459 in the 16-bit sets)
    ignore_values: tuple[int, ...] = ()
    #: images whose EXIF orientation tag is not 1: protocols with ``exif_orientation: apply`` turn them (their
    #: references' readers do), the others read the pixels as stored
    exif_tagged: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.found and not self.problems and (self.expected is None or self.num_images == self.expected)

    def line(self) -> str:
        if not self.found:
            return f"{self.dataset:14s} {self.split:6s} MISSING   {self.problems[0] if self.problems else ''}"
        status = "OK" if self.complete else "INCOMPLETE" if not self.problems else "BAD"
        count = f"{self.num_images}" + (f"/{self.expected}" if self.expected is not None else "")
        ids = [v for v in self.label_values if v not in self.ignore_values]
        values = f"raw ids {min(ids)}..{max(ids)}" if ids else ""
        ignored = [str(v) for v in self.ignore_values if v in self.label_values]
        values += f" (+{'/'.join(ignored)} ignore)" if ignored else ""
        extra = f"; {self.exif_tagged} with an EXIF orientation tag" if self.exif_tagged else ""
        extra += f"; {len(self.problems)} problem(s): {self.problems[0]}" if self.problems else ""
        return f"{self.dataset:14s} {self.split:6s} {status:10s} {count:>11s} images  {values}{extra}"


def verify_dataset(name: str, root: str | Path, split: str = "val", check_labels: bool = True,
                   max_problems: int = 20, progress: bool = False) -> VerifyReport:
    spec = get_spec(name)
    ignore_values = (spec.ignore_index, *spec.raw_ignore)
    report = VerifyReport(name, split, found=False, expected=spec.expected_counts.get(split),
                          ignore_values=ignore_values)
    try:
        samples = list_samples(spec, root, split)
    except DataError as e:
        report.problems.append(str(e))
        return report
    report.found = True
    report.num_images = len(samples)
    if not check_labels:
        return report
    seen: set[int] = set()
    raw_limit = spec.num_classes + (1 if spec.reduce_zero_label else 0)
    for _, image_path, label_path in tqdm(samples, desc=f"verify {name}", disable=not progress):
        try:
            raw = read_label_png(label_path)
            with Image.open(image_path) as im:
                width, height = im.size
                tagged = im.getexif().get(EXIF_ORIENTATION, 1) not in (1, None)
        except (DataError, OSError) as e:
            report.problems.append(str(e))
        else:
            report.exif_tagged += int(tagged)
            values = np.unique(raw)
            seen.update(int(v) for v in values)
            bad = values[(values >= raw_limit) & ~np.isin(values, ignore_values)]
            if bad.size:
                report.problems.append(
                    f"{label_path}: raw values {bad.tolist()[:10]} outside 0..{raw_limit - 1} and "
                    f"{'/'.join(map(str, ignore_values))} ({spec.num_classes} classes)"
                )
            if raw.shape != (height, width):
                report.problems.append(f"{label_path}: size {raw.shape[1]}x{raw.shape[0]} != image {width}x{height}")
        if len(report.problems) >= max_problems:
            report.problems.append("… stopped after too many problems")
            break
    report.label_values = sorted(seen)
    return report
