"""ProxyCLIP's released code vs ovseg's ProxyCLIP and ``proxyclip`` protocol: set OVSEG_PARITY_PROXYCLIP to a
mc-lan/ProxyCLIP checkout and OVSEG_PARITY_DINO to a facebookresearch/dino one (their torch.hub DINO). A small
variant: DINO ViT-B/8 on one 224 window (SAM and MAE: ``ovseg parity --ref ProxyCLIP=DIR``), label maps of one odd
size on VOC21 (with and without its threshold) and Cityscapes with a 1-block DINO."""

import sys

from tests.parity.parity_support import assert_all_passed, reference_checkout

from ovseg.parity import proxyclip


def test_proxyclip_windows_and_protocol_match_the_authors_code(tmp_path):
    installed = {name: sys.modules.get(name) for name in ("open_clip", "segment_anything")}
    records = proxyclip.run(reference_checkout("ProxyCLIP"), work_dir=tmp_path, dino_dir=reference_checkout("DINO"),
                            kinds=("dino",), window_sizes={"224x224": (224, 224)}, datasets=("voc21", "cityscapes"),
                            image_sizes={"odd 397x541": (397, 541)}, label_dino_depth=1)
    quantities = {r.quantity for r in records}
    assert {"VFM features dino 224x224", "proxy features dino 224x224", "window logits dino 224x224",
            "weights: hub dino_vitb8 -> timm vit_base_patch8_224.dino"} <= quantities
    assert {"labels voc21 odd 397x541", "labels cityscapes odd 397x541",
            "labels without threshold voc21 odd 397x541"} <= quantities
    assert sum(q.startswith("proxy last block") for q in quantities) == 2
    assert_all_passed(records)
    for name, module in installed.items():  # their vendored copies were set aside again
        assert module is None or sys.modules[name] is module
