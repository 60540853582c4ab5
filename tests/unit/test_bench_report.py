"""`ovseg bench report`: RESULTS.md / results.csv from results files + metafiles."""

import csv
import io
import json
from pathlib import Path

import pytest

from ovseg import __version__
from ovseg.bench.metafile import load_metafiles
from ovseg.bench.report import build_report, write_report
from ovseg.cli import main

REPO = Path(__file__).resolve().parents[2]
META_DIR = REPO / "benchmarks" / "metafiles"


@pytest.fixture(scope="module")
def metas():
    return load_metafiles(META_DIR)


def results(method, protocol, scores, version=__version__, weights="ViT-B-16/openai", bench=None, per_class=None):
    """A results.json in the schema of ovseg.eval.results (only what the report reads is realistic)."""
    datasets = {}
    for name, (miou, pacc, macc) in scores.items():
        datasets[name] = {"protocol": protocol, "num_images": 10, "mIoU": miou, "pAcc": pacc, "mAcc": macc,
                          "class_names": [["a"]], "per_class": per_class or {"a": {"IoU": miou, "Acc": macc}}}
    data = {"method": method, "weights": weights, "ovseg_version": version, "world_size": 1, "config": {},
            "protocol": {"name": protocol, "version": 1, "source": f"{protocol}.yaml"}, "datasets": datasets}
    if bench:
        data["bench"] = bench
    return data


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


SCLIP_ALL = {"voc21": (44.0, 80.0, 60.0), "context60": (23.2, 50.0, 40.0), "coco_object": (20.0, 60.0, 30.0),
             "voc20": (75.0, 90.0, 80.0), "context59": (26.4, 50.0, 40.0), "coco_stuff171": (16.7, 40.0, 30.0),
             "cityscapes": (24.9, 70.0, 40.0), "ade150": (11.9, 40.0, 20.0)}


@pytest.fixture
def result_dir(tmp_path):
    root = tmp_path / "res"
    bench = {"suite": "s", "entry": "maskclip_vitb16.sclip", "evaluations": ["maskclip_vitb16/sclip"],
             "role": "entry", "complete": True}
    write(root / "maskclip_sclip/results.json", results("MaskCLIP", "sclip", SCLIP_ALL, bench=bench))
    # an older ovseg, and without coco_object: both must be reported, not dropped
    old = {k: v for k, v in SCLIP_ALL.items() if k != "coco_object"}
    write(root / "clip_sclip_old/results.json", results("CLIP", "sclip", old, version="0.0.1"))
    # a piece of a suite run: never a row of its own
    write(root / "maskclip_sclip/parts/voc21/results.json",
          results("MaskCLIP", "sclip", {"voc21": (1.0, 1.0, 1.0)}, bench={**bench, "role": "part"}))
    # the 4-fold aggregate of CLIP-S4
    fold = results("CLIPS4", "maskclip", {"context59": (30.0, 55.0, 52.0)}, weights="fold0: a; fold1: b",
                   bench={"evaluations": ["clips4_vitb16/context59_unknown_4fold"], "role": "entry", "complete": True})
    fold["datasets"]["context59"].update(std={"mIoU": 1.0, "pAcc": 0.8, "mAcc": 0.25},
                                         folds={"fold0": {"pAcc": 54.2}, "fold1": {"pAcc": 55.8}})
    write(root / "clips4_folds/results.json", fold)
    write(root / "tiny/results.json", results("MaskCLIP", "maskclip", {"voc21": (1.5, 2.0, 3.0)},
                                              weights="tiny-vit/random"))
    write(root / "broken/results.json", "{not json")
    # one PixelCLIP checkpoint run by hand: which of the four variants? not guessed
    write(root / "pixelclip_by_hand/results.json", results("PixelCLIP", "pixelclip", {"voc20": (80.0, 90.0, 85.0)},
                                                          weights="checkpoint:/w/pixelclip.ckpt"))
    return root


def test_report_is_byte_reproducible(metas, result_dir, tmp_path):
    first = write_report(build_report(metas, [result_dir]), tmp_path / "a")
    again = write_report(build_report(metas, [result_dir]), tmp_path / "b")
    for x, y in zip(first, again):
        assert x.read_bytes() == y.read_bytes()
    # and through the command, into the same folder twice
    for _ in range(2):
        assert main(["bench", "report", "--results", str(result_dir), "--out", str(tmp_path / "c"),
                     "--metafiles", str(META_DIR)]) == 0
        assert (tmp_path / "c/RESULTS.md").read_bytes() == first[0].read_bytes()
        assert (tmp_path / "c/results.csv").read_bytes() == first[1].read_bytes()


def test_cells_rows_notes(metas, result_dir):
    report = build_report(metas, [result_dir])
    md = report.markdown()
    label = f"{result_dir}/"
    # ours / paper (difference)
    assert "| 44.00 / 43.4 (+0.60) |" in md and "| 16.70 / 16.7 (+0.00) |" in md
    row = report.by_id["maskclip_vitb16/sclip"]
    assert report.status(row) == "✓ measured" and row.results.label == f"{label}maskclip_sclip/results.json"
    # old version + missing dataset: shown, marked, and explained in the notes
    clip = report.by_id["clip_vitb16/sclip"]
    assert report.status(clip) == "◐ partial (missing coco_object) ⚠ ovseg 0.0.1"
    notes = "\n".join(report.notes)
    assert f"`{label}clip_sclip_old/results.json` (clip_vitb16/sclip): written by an older ovseg (0.0.1" in notes
    assert f"`{label}clip_sclip_old/results.json` (clip_vitb16/sclip): no coco_object in the results file" in notes
    # matched without a suite record: by method + protocol (+ weights id), and said so
    assert "clip_sclip_old/results.json`: no suite record; matched by method and protocol to clip_vitb16/sclip" in notes
    # 4-fold mean ± std beside the paper's
    assert "| 55.00±0.80 / 54.4±1.0 (+0.60) |" in md and "| 52.00±0.25 / 52.3±0.5 (-0.30) |" in md
    # pieces of a suite run are not rows; unreadable and unmatched files are listed, not dropped
    assert "parts/voc21" not in md
    assert f"`{label}broken/results.json`: unreadable" in notes
    assert "pixelclip_by_hand/results.json`: could be any of pixelclip_convnextb_dino, pixelclip_conv" in notes
    assert report.by_id["pixelclip_vitb16_sa1b/paper"].results is None
    assert "## Other results" in md and f"| `{label}tiny/results.json` | MaskCLIP | maskclip | tiny-vit/random |" in md
    # rows without results are clearly marked, with the reason
    pixel = report.by_id["pixelclip_vitb16_sa1b/paper"]
    assert report.status(pixel).startswith("✗ not reproduced: ") and "convert-pixelclip" in report.status(pixel)
    assert report.status(report.by_id["clips4_vitb16/coco_stuff"]).startswith("✗ not reproduced: no published weights")
    assert "| — / 85.9 |" in md


def test_csv_has_one_row_per_number(metas, result_dir):
    rows = list(csv.DictReader(io.StringIO(build_report(metas, [result_dir]).csv())))
    by = {(r["metafile"], r["evaluation"], r["dataset"], r["metric"]): r for r in rows}
    r = by[("maskclip_vitb16", "sclip", "voc21", "mIoU")]
    assert (r["paper"], r["ours"], r["diff"], r["status"]) == ("43.4", "44.00", "0.60", "✓ measured")
    assert r["our_weights"] == "ViT-B-16/openai" and r["ovseg_version"] == __version__
    r = by[("clips4_vitb16", "context59_unknown_4fold", "context59", "pAcc")]
    assert (r["paper"], r["paper_std"], r["ours"], r["ours_std"]) == ("54.4", "1.0", "55.00", "0.80")
    r = by[("pixelclip_vitb16_sa1b", "paper", "voc20", "mIoU")]
    assert (r["paper"], r["ours"], r["status"][:16]) == ("85.9", "", "✗ not reproduced")
    assert by[("clips4_vitb16", "voc_knn", "voc21", "IoU/dining table")]["paper"] == "57.5"
    assert any(r["status"] == "unmatched" and r["results_file"].endswith("tiny/results.json") for r in rows)
    n_paper = sum(1 for m in metas.values() for e in m.evaluations for _ in e.values())
    assert sum(1 for r in rows if r["paper"]) == n_paper


def test_missing_results_folder_is_an_error(metas, tmp_path):
    with pytest.raises(FileNotFoundError, match="results folder or file not found"):
        build_report(metas, [tmp_path / "nope"])


def test_committed_results_md_is_generated(metas):
    """benchmarks/RESULTS.md and results.csv are `ovseg bench report` output (no results committed):
    after changing a metafile or running `ovseg parity`, regenerate with
    `ovseg bench report --results <empty> --out benchmarks` (which reads benchmarks/parity.json)."""
    report = build_report(metas, [], parity_dir=REPO / "benchmarks")
    assert (REPO / "benchmarks/RESULTS.md").read_text(encoding="utf-8") == report.markdown()
    assert (REPO / "benchmarks/results.csv").read_text(encoding="utf-8") == report.csv()
