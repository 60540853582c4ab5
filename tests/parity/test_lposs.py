"""LPOSS's released code vs ovseg's LPOSS / LPOSS+ and ``lposs`` protocol: set OVSEG_PARITY_LPOSS to a
vladan-stojnic/LPOSS checkout and OVSEG_PARITY_DINO to a facebookresearch/dino one (their torch.hub DINO); needs
faiss-cpu, kornia and omegaconf (the [parity] extra) and mmcv 1.x (ovseg.parity.maskclip.mmcv1_dir). A small variant:
the window, text and patch-propagation rows, and LPOSS's label map of one odd size on VOC21 (the full record, LPOSS+
and six sizes: ``ovseg parity --ref LPOSS=DIR``)."""

import importlib.util

import pytest
from tests.parity.parity_support import assert_all_passed, reference_checkout

from ovseg.parity import lposs


def test_lposs_windows_propagation_and_protocol_match_the_authors_code(tmp_path):
    ref_dir = reference_checkout("LPOSS")
    missing = [m for m in ("faiss", "kornia", "omegaconf") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"LPOSS parity needs {', '.join(missing)}: pip install faiss-cpu kornia omegaconf")
    records = lposs.run(ref_dir, work_dir=tmp_path, dino_dir=reference_checkout("DINO"), datasets=("voc21",),
                        variants=("LPOSS",), image_sizes={"odd 397x541": (397, 541)}, pixel_rows=False)
    quantities = {r.quantity for r in records}
    assert {"text embeddings voc21", "DINO values 224x224 window", "MaskCLIP features 224x224 window",
            "labels LPOSS voc21 odd 397x541"} <= quantities
    assert any(q.startswith("patch scores after LP, same inputs and neighbours") for q in quantities)
    assert_all_passed(records)
