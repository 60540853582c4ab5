"""`ovseg parity` bookkeeping: parity.json sections per reference, PARITY.md regenerated from it, and the
leaderboard's per-row parity column."""

import json

import pytest

from ovseg.bench.metafile import load_metafiles
from ovseg.bench.report import build_report
from ovseg.parity.common import ParityRecord, label_record, max_rel_diff, tensor_record
from ovseg.parity.report import load_parity, protocol_parity, update_parity

from .test_bench_report import META_DIR


def _records(reference, passed=True):
    return [ParityRecord(reference, "dense features 224x224", max_rel_diff=1e-7, tolerance=1e-5, passed=True),
            ParityRecord(reference, "labels voc21 375x500", "maskclip", identical_share=1.0 if passed else 0.9,
                         tolerance=0.9999, passed=passed)]


def test_sections_are_replaced_per_reference_and_markdown_follows(tmp_path):
    env = {"torch": "x", "device": "cpu"}
    update_parity(tmp_path, "MaskCLIP", "a" * 40, ["maskclip"], _records("MaskCLIP", passed=False), env)
    update_parity(tmp_path, "SCLIP", "b" * 40, ["sclip"], _records("SCLIP"), env)
    update_parity(tmp_path, "MaskCLIP", "c" * 40, ["maskclip"], _records("MaskCLIP"), env)  # rerun: replaced
    data = load_parity(tmp_path)
    assert list(data["references"]) == ["MaskCLIP", "SCLIP"]
    assert data["references"]["MaskCLIP"]["commit"] == "c" * 40 and data["references"]["MaskCLIP"]["passed"]
    md = (tmp_path / "PARITY.md").read_text()
    assert "## MaskCLIP — passed" in md and "`" + "c" * 40 + "`" in md and "a" * 40 not in md
    assert "| labels voc21 375x500 | maskclip |  | 100.0000 % | 99.9900 % | ✓ |" in md
    assert protocol_parity(tmp_path) == {"maskclip": {"references": ["MaskCLIP@ccccccc"], "passed": True},
                                         "sclip": {"references": ["SCLIP@bbbbbbb"], "passed": True}}


def test_a_failed_record_fails_its_reference_and_protocol(tmp_path):
    update_parity(tmp_path, "SCLIP", "d" * 40, ["sclip"], _records("SCLIP", passed=False), {})
    assert json.loads((tmp_path / "parity.json").read_text())["references"]["SCLIP"]["passed"] is False
    assert protocol_parity(tmp_path)["sclip"]["passed"] is False
    assert "## SCLIP — NOT passed" in (tmp_path / "PARITY.md").read_text()


def test_leaderboard_rows_show_their_protocols_parity(tmp_path):
    update_parity(tmp_path, "MaskCLIP", "e" * 40, ["maskclip"], _records("MaskCLIP"), {})
    md = build_report(load_metafiles(META_DIR), [], parity_dir=tmp_path).markdown()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "`" in line and "/" in line]
    maskclip_rows = [r for r in rows if "| maskclip |" in r]
    sclip_rows = [r for r in rows if "| sclip |" in r]
    assert maskclip_rows and all("✓ MaskCLIP@eeeeeee" in r for r in maskclip_rows)
    assert sclip_rows and all("not checked" in r for r in sclip_rows)


def test_comparison_statistics():
    import torch

    ref = torch.tensor([[1.0, -4.0], [2.0, 0.0]])
    assert max_rel_diff(ref + torch.tensor([[0.0, 0.0], [0.0, 4e-5]]), ref) == pytest.approx(1e-5, rel=1e-6)
    assert tensor_record("R", "q", ref * (1 + 2e-5), ref).passed is False
    ours = torch.zeros(10, 10, dtype=torch.long)
    theirs = ours.clone()
    theirs[0, 0] = 1
    record = label_record("R", "q", ours, theirs)
    assert record.identical_share == 0.99 and not record.passed


def test_rows_show_the_text_precision_of_both_sides(tmp_path):
    record = label_record("MaskCLIP", "label map voc20 odd 397x541", [[1, 2]], [[1, 2]], protocol="maskclip",
                          text_precision="ovseg fp16, reference fp16")
    update_parity(tmp_path, "MaskCLIP", "e" * 40, ["maskclip"], [record], {})
    assert load_parity(tmp_path)["references"]["MaskCLIP"]["records"][0]["text_precision"] == \
        "ovseg fp16, reference fp16"
    assert "| ✓ | ovseg fp16, reference fp16 |" in (tmp_path / "PARITY.md").read_text()


def test_parity_says_which_extra_is_missing_before_any_work(tmp_path, monkeypatch, capsys):
    import importlib.util

    from ovseg.cli import main

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mmengine" else real_find_spec(name, *a))
    (tmp_path / "NACLIP").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["parity", "--ref", f"NACLIP={tmp_path / 'NACLIP'}"])
    message = str(exc.value)
    assert "[parity] extra" in message and "mmengine" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["NACLIP"]  # nothing written (no outputs/parity)


def test_parity_writes_into_outputs_by_default_not_the_committed_record():
    import argparse

    from ovseg.parity.commands import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    ns = parser.parse_args(["parity", "--ref", "NACLIP=/nowhere"])
    assert ns.out == "outputs/parity"


def test_trained_weights_are_read_from_a_state_dict_file(tmp_path):
    import torch

    from ovseg.parity.common import trained_openai_clip

    state = {"visual.conv1.weight": torch.randn(4, 3, 2, 2), "token_embedding.weight": torch.randn(5, 4),
             "context_length": torch.tensor(77)}  # OpenAI's archive carries three scalars build_model drops
    torch.save({"state_dict": state}, tmp_path / "clip.pt")
    loaded = torch.load(trained_openai_clip(tmp_path / "clip.pt", tmp_path / "work"))
    assert sorted(loaded) == ["token_embedding.weight", "visual.conv1.weight"]
    assert torch.equal(loaded["visual.conv1.weight"], state["visual.conv1.weight"])
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not OpenAI-layout CLIP weights"):
        trained_openai_clip(tmp_path / "other.pt", tmp_path / "work")


def test_weights_mode_names_the_references_that_lack_it(tmp_path, monkeypatch):
    from ovseg.cli import main

    (tmp_path / "NACLIP").mkdir()
    (tmp_path / "clip.pt").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="--weights: not supported for NACLIP yet"):
        main(["parity", "--ref", f"NACLIP={tmp_path / 'NACLIP'}", "--weights", str(tmp_path / "clip.pt")])
