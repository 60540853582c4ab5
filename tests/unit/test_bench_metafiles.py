"""benchmarks/metafiles: schema, every number against the table it cites (benchmarks/sources/), and those tables
against the project's source documents where they are checked out (../shared)."""

import re
from pathlib import Path

import pytest
import yaml

from ovseg.bench.metafile import MetafileError, PaperValue, load_metafile, load_metafiles
from ovseg.bench.citations import check_metafile_sources, markdown_table_after, tsv_table_before
from ovseg.bench.suite import load_suite

REPO = Path(__file__).resolve().parents[2]
META_DIR = REPO / "benchmarks" / "metafiles"
SOURCES = REPO / "benchmarks" / "sources"
SHARED_BASE = REPO.parent  # the folder holding shared/ (the project's source documents, beside the repository)
HAVE_SHARED = (SHARED_BASE / "shared" / "spec" / "pixelclip.md").is_file()
VARIANTS = {"pixelclip_vitb16_sa1b", "pixelclip_vitb16_dino", "pixelclip_convnextb_sa1b", "pixelclip_convnextb_dino",
            "clips4_vitb16", "maskclip_vitb16", "clip_vitb16", "clip_convnextb", "sclip_vitb16", "naclip_vitb16",
            "clearclip_vitb16", "maskclip_rn50", "maskclip_rn50x16", "segsort_resnet101", "maskclip_plus_vitb16",
            "maskclip_plus_rn50", "maskclip_plus_rn50x16", "resclip_vitb16", "resclip_vitl14", "trident_vitb16",
            "trident_vith14", "itaclip_vitb16", "cliptrase_vitb16",
            "proxyclip_vitb16", "proxyclip_vith14"}


@pytest.fixture(scope="module")
def metas():
    return load_metafiles(META_DIR)


def test_one_metafile_per_method_variant(metas):
    assert set(metas) == VARIANTS
    assert {m.method for m in metas.values()} == {"PixelCLIP", "CLIPS4", "MaskCLIP", "CLIP", "SCLIP", "NACLIP",
                                                  "ClearCLIP", "SegSort", "MaskCLIPPlus", "ResCLIP", "Trident",
                                                  "ITACLIP", "ProxyCLIP", "CLIPtrase"}
    for m in metas.values():
        assert m.model.get("hardware") and m.paper["title"]
        assert all(e.sources for e in m.evaluations)
        # weights: an address wherever published, a sha256 only with an address
        assert m.weights.get("sha256") is None or m.weights.get("url")
    pixel = metas["pixelclip_vitb16_sa1b"]
    assert pixel.weights["url"].endswith("/pixelclip_vit_base.pth") and "A6000" in pixel.model["hardware"]
    assert metas["clips4_vitb16"].weights["url"] is None and "V100" in metas["clips4_vitb16"].model["hardware"]


def test_every_number_matches_the_document_it_cites(metas):
    assert all(s.document.startswith("sources/") for m in metas.values() for e in m.evaluations for s in e.sources)
    problems = [p for m in metas.values() for p in check_metafile_sources(m)]
    assert not problems, "\n".join(problems)


# A sample typed in from the sources themselves, so the check above cannot pass by parsing wrongly.
# PixelCLIP (arXiv:2409.19846) Table 1, row PixelCLIP | ViT-B/16 | SA-1B:
PIXELCLIP_VITB16_SA1B = {"coco_stuff171": 23.6, "ade150": 18.7, "context59": 37.9, "cityscapes": 27.2, "voc20": 85.9}


def test_hardcoded_sample_matches_the_metafiles(metas):
    paper = metas["pixelclip_vitb16_sa1b"].evaluation("paper").results
    assert {d: v["mIoU"].value for d, v in paper.items()} == PIXELCLIP_VITB16_SA1B
    # CLIP-S4 supplementary Table 2 (Pascal Context with unknown classes, 4-fold mean): CLIP-S4 54.4±1.0/52.3±0.5
    fold = metas["clips4_vitb16"].evaluation("context59_unknown_4fold")
    assert fold.results["context59"] == {"pAcc": PaperValue(54.4, 1.0), "mAcc": PaperValue(52.3, 0.5)}
    assert [f.config for f in fold.folds] == ["configs/clips4_context.yaml"] * 4  # one config, the fold a setting
    assert [f.overrides for f in fold.folds] == [{"model.init_args.known_classes": f"context59-fold{i}"}
                                                 for i in range(4)]
    # the SCLIP-family training-free table, MaskCLIP row: VOC21 43.4, City 24.9
    sclip = metas["maskclip_vitb16"].evaluation("sclip").results
    assert sclip["voc21"]["mIoU"].value == 43.4 and sclip["cityscapes"]["mIoU"].value == 24.9
    # CLIP-S4 supplementary Table 4, CLIP-S4 row: Aero 83.5, Table 57.5, TV 63.2
    knn = metas["clips4_vitb16"].evaluation("voc_knn").results["voc21"]
    assert [knn[f"IoU/{c}"].value for c in ("aeroplane", "dining table", "tv monitor")] == [83.5, 57.5, 63.2]
    per_class = [v.value for k, v in knn.items() if k.startswith("IoU/")]
    assert len(per_class) == 21 and round(sum(per_class) / 21, 1) == knn["mIoU"].value == 72.0


def test_cited_table_parsed_at_test_time_gives_the_sample():
    rows = markdown_table_after((SOURCES / "pixelclip.md").read_text(), "Table 1:")
    row = next(r for r in rows if r["method"] == "PixelCLIP" and r["backbone"] == "ViT-B/16" and r["masks"] == "SA-1B")
    columns = {"coco_stuff171": "COCO-Stuff 171", "ade150": "ADE-150", "context59": "Context 59",
               "cityscapes": "Cityscapes 19", "voc20": "VOC 20"}
    assert {d: float(row[c]) for d, c in columns.items()} == PIXELCLIP_VITB16_SA1B


def _numeric_rows(rows: list[dict[str, str]], key_columns: int) -> dict[tuple, list[float]]:
    out = {}
    for row in rows:
        values = list(row.values())
        out[tuple(values[:key_columns])] = [float(x) for v in values[key_columns:] for x in re.findall(r"\d+\.\d+", v)]
    return out


@pytest.mark.skipif(not HAVE_SHARED, reason="the project's source documents (../shared) are not checked out here")
@pytest.mark.parametrize("ours, theirs, marker_ours, marker_theirs, keys", [
    ("pixelclip.md", "shared/spec/pixelclip.md", "Table 1:", "Headline numbers", 3),
    ("training_free.md", "shared/spec/evaluation.md", "Table: CLIP ViT-B/16", "Reference numbers for the", 1),
])
def test_cited_tables_equal_the_project_documents(ours, theirs, marker_ours, marker_theirs, keys):
    mine = _numeric_rows(markdown_table_after((SOURCES / ours).read_text(), marker_ours), keys)
    spec = _numeric_rows(markdown_table_after((SHARED_BASE / theirs).read_text(), marker_theirs), keys)
    assert mine == spec


@pytest.mark.skipif(not HAVE_SHARED, reason="the project's source documents (../shared) are not checked out here")
def test_clips4_tables_equal_the_supplementary_and_the_spec():
    text = (SOURCES / "clips4.md").read_text()
    per_class = markdown_table_after(text, "Supplementary Tables 3 and 4")
    seed = tsv_table_before((SHARED_BASE / "shared/seeds/001_74091a68a91efbb4.txt").read_text(), "Table 4. Per-class")
    assert len(per_class) == len(seed) == 7
    for ours, theirs in zip(per_class, seed):
        classes = [c for c in theirs if c != "Method"]
        assert [ours[c].replace("–", "-") for c in classes] == [theirs[c] for c in classes]
    # pAcc / mAcc (Tables 1-3) and MaskCLIP's own numbers: the spec's reference lines, in order, row by row
    spec = " ".join((SHARED_BASE / "shared/spec/clips4.md").read_text().split("## Reference numbers")[1].split())
    spec_numbers = [float(x) for x in re.findall(r"\d+\.\d+", spec)]

    def appears_in_order(numbers: list[float]) -> bool:
        n = len(numbers)
        return any(spec_numbers[i:i + n] == numbers for i in range(len(spec_numbers) - n + 1))

    for marker in ("Supplementary Table 1:", "Supplementary Table 2:", "MaskCLIP's own numbers"):
        for row in markdown_table_after(text, marker):
            numbers = [float(x) for v in row.values() for x in re.findall(r"\d+\.\d+", v)]
            assert appears_in_order(numbers), (marker, row)
    for row in per_class:
        numbers = [float(x) for x in re.findall(r"\d+\.\d+", " ".join([row["mIoU"], row["pAcc"], row["mAcc"]]))]
        assert not numbers or all(x in spec_numbers for x in numbers), row


# -- the checker itself, on documents written here --------------------------------------------------
DOC = """# Paper

## Table of results
| method | VOC 20 | PC-59 |
|---|---|---|
| Ours | 85.9 | 37.9 |
| Other | 80.0 | 30.0 |

Prose: **Ours 54.4±1.0/52.3±0.5** on folds.

a\tVOC\tPC
Ours\t1.5 (+0.2)\t2.5
Table 9. A caption under a tab-separated table.
"""

META = {
    "schema": 1, "name": "toy", "method": "Toy", "variant": "v",
    "paper": {"title": "T"}, "model": {"backbone": "B", "hardware": "1 GPU"}, "weights": {"url": None},
    "evaluations": [{
        "name": "e", "protocol": "maskclip", "config": None,
        "results": {"voc20": {"mIoU": 85.9, "pAcc": 1.5},
                    "context59": {"mIoU": 37.9, "pAcc": {"value": 54.4, "std": 1.0}}},
        "sources": [
            {"document": "doc.md", "table": "Table of results", "row": {"method": "Ours"},
             "columns": {"voc20.mIoU": "VOC 20", "context59.mIoU": "PC-59"}},
            {"document": "doc.md", "quote": "Ours 54.4±1.0/52.3±0.5", "covers": ["context59.pAcc"]},
            {"document": "doc.md", "format": "tsv", "table": "Table 9.", "row": {"a": "Ours"},
             "columns": {"voc20.pAcc": "VOC"}},
        ],
    }],
}


def _write_meta(tmp_path, data, name="toy"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


def test_checker_accepts_correct_and_names_wrong_numbers(tmp_path):
    (tmp_path / "doc.md").write_text(DOC)
    assert check_metafile_sources(load_metafile(_write_meta(tmp_path, META)), tmp_path) == []
    wrong = yaml.safe_load(yaml.safe_dump(META))
    wrong["evaluations"][0]["results"]["voc20"]["mIoU"] = 86.0
    wrong["evaluations"][0]["results"]["context59"]["pAcc"]["std"] = 1.5
    wrong["evaluations"][0]["results"]["voc20"]["pAcc"] = 2.5
    problems = check_metafile_sources(load_metafile(_write_meta(tmp_path, wrong)), tmp_path)
    text = "\n".join(problems)
    assert len(problems) == 3, text
    assert "voc20.mIoU = 86" in text and "'85.9'" in text and "[54.4, 1.5]" in text and "voc20.pAcc = 2.5" in text
    assert str(tmp_path / "toy.yaml") in text
    assert tsv_table_before(DOC, "Table 9.") == [{"a": "Ours", "VOC": "1.5 (+0.2)", "PC": "2.5"}]


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.pop("paper"), "missing required key(s) ['paper']"),
    (lambda m: m.update(name="other"), "must equal the file name 'toy'"),
    (lambda m: m.update(schema=2), "unsupported schema version 2"),
    (lambda m: m["weights"].update(sha256="abc", url="http://x"), "expected 64 lowercase hex digits"),
    (lambda m: m["evaluations"][0]["results"].update(voc=m["evaluations"][0]["results"].pop("voc20")),
     "unknown dataset 'voc'"),
    (lambda m: m["evaluations"][0]["results"]["voc20"].update(mIoU="high"), "expected a number, got 'high'"),
    (lambda m: m["evaluations"][0]["results"]["voc20"].update(mIoU=123.0), "expected a percentage"),
    (lambda m: m["evaluations"][0]["results"]["voc20"].update(mAcc=50.0), "numbers without a source: ['voc20.mAcc']"),
    (lambda m: m["evaluations"][0]["results"]["voc20"].update(per_class_IoU={"aero": 1.0}), "unknown class 'aero'"),
    (lambda m: m["evaluations"][0]["sources"][1].update(covers=["ade150.mIoU"]), "cites 'ade150.mIoU'"),
    (lambda m: m["evaluations"][0].update(folds=[{"name": "a", "config": "x.yaml"}]), "at least 2 folds"),
    (lambda m: m.update(extra_key=1), "unknown key(s) ['extra_key']"),
])
def test_schema_errors_name_the_file_and_the_field(tmp_path, mutate, message):
    data = yaml.safe_load(yaml.safe_dump(META))
    mutate(data)
    path = _write_meta(tmp_path, data)
    with pytest.raises(MetafileError) as info:
        load_metafile(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_broken_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(MetafileError, match=str(path)):
        load_metafiles(tmp_path)


def test_shipped_suites_resolve_their_metafile_evaluations(metas):
    suites = sorted((REPO / "benchmarks" / "suites").glob("*.yaml"))
    assert {p.stem for p in suites} >= {"tiny", "baselines", "paper"}
    for path in suites:
        suite = load_suite(path, metafiles=metas)
        assert suite.entries
    paper = load_suite(REPO / "benchmarks/suites/paper.yaml", metafiles=metas)
    fold_entry = next(e for e in paper.entries if e.name == "clips4_vitb16.context59_unknown_4fold")
    assert fold_entry.evaluations == ["clips4_vitb16/context59_unknown_4fold"]
    baselines = load_suite(REPO / "benchmarks/suites/baselines.yaml", metafiles=metas)
    assert not [e.name for e in baselines.entries if e.not_runnable]  # public weights, configs exist
