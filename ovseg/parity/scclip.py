"""SC-CLIP (SuleBai/SC-CLIP) beside :class:`ovseg.methods.SCCLIP` and the ``scclip`` protocol:

- their ``clip/model.py`` ``lof_pytorch`` and ``VisionTransformer.mean_interpolation`` against
  :func:`~ovseg.methods.scclip.lof_scores` / :func:`~ovseg.methods.scclip.anomaly_tokens` /
  :func:`~ovseg.methods.scclip.resolve_anomalies` on random tokens;
- their self-calibrated image tower (``encode_image(x, return_all=True)``: patch tokens after ``ln_post``/``proj``;
  the released ViT-B/16 settings of ``configs/base_config.py``) against ovseg's patch tokens on the same random
  ViT-B/16 weights, on square inputs (their anomaly positions, ``index // feat_w`` with ``feat_w`` the number of
  rows, are row-major only on square grids; every window of their pipeline is a 224×224 square);
- their segmentor (``scclip_segmentor.py`` ``SCCLIPForSegmentation`` with ``configs/cfg_*.py``) against the shared
  evaluator under the ``scclip`` protocol: text embeddings, model input and label maps of generated images of six
  sizes (:data:`~ovseg.parity.common.IMAGE_SIZES`, 2048x1024 included), through the SCLIP/NACLIP harness
  (:mod:`ovseg.parity.mmseg_clip`); the reference runs one window at a time, ovseg batches them.

Both sides run fp32 on the CPU with fp16-exact random weights, as the SCLIP/NACLIP comparisons.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from ovseg.parity.common import IMAGE_SIZES, ParityRecord, generated_image, label_record, tensor_record
from ovseg.parity.mmseg_clip import CONFIG_STEMS, Harness, Variant, fp16_exact_clip, run_harness

PROTOCOLS = ("scclip",)
#: square inputs of the dense comparison: one window, the trained grid, a larger grid
DENSE_SIZES: dict[str, tuple[int, int]] = {"224x224": (224, 224), "320x320": (320, 320), "448x448": (448, 448)}
#: VOC21's area threshold makes their postprocess run on the whole image ([21 classes, 56 queries, H, W] floats:
#: 10 GB at 2048x1024), so VOC21 runs on the other sizes; the other datasets on all of them
VOC21_SIZES = {k: v for k, v in IMAGE_SIZES.items() if max(v) < 2048}


def scclip_method(folder: Path, variant: Variant):
    """ovseg's SC-CLIP on the harness's weights folder (the released ViT-B/16 settings)."""
    from ovseg.methods.scclip import SCCLIP
    from ovseg.models.clip import CLIPConfig

    return SCCLIP(CLIPConfig(name=f"local-dir:{folder}", pretrained=None, quick_gelu=True, **variant.clip))


HARNESS = Harness(
    reference="SC-CLIP",
    protocol="scclip",
    segmentor=("scclip_segmentor", "SCCLIPForSegmentation"),
    configs=CONFIG_STEMS,
    # their encode_image has no switch: the one variant is the method (ovseg's CLIPConfig as loaded, the last stage
    # set by SCCLIP)
    variants=(Variant("scclip"),),
    label_variant="scclip",
    label_datasets=("context60", "coco_object", "coco_stuff171", "cityscapes"),
    full_text_dataset="coco_stuff171",
    method_factory=scclip_method,
)


def component_records(ref_dir: Path, device: str) -> list[ParityRecord]:
    """Their ``lof_pytorch`` and ``mean_interpolation`` against ovseg's on random tokens of a 14x14 grid (the
    anomalies of a few tokens made far from the rest, as CLIP's anomaly tokens are)."""
    from ovseg.methods.scclip import anomaly_tokens, lof_scores, resolve_anomalies
    from ovseg.parity.mmseg_clip import stand_ins
    from ovseg.parity.common import reference_imports

    records = []
    with reference_imports(ref_dir, stand_ins()):
        model = importlib.import_module("clip.model")
        for seed in (0, 1):
            generator = torch.Generator().manual_seed(seed)
            tokens = torch.randn(196, 768, generator=generator)
            tokens[torch.randperm(196, generator=generator)[:6]] *= 8  # far-away tokens
            their_indices, their_scores = model.lof_pytorch(tokens, n_neighbors=30, contamination=0.05)
            ours_scores = lof_scores(tokens[None], 30)[0]
            ours_mask = anomaly_tokens(tokens[None], 30, 0.05)[0]
            theirs_mask = torch.zeros(196, dtype=torch.bool)
            theirs_mask[their_indices] = True
            records.append(tensor_record("SC-CLIP", f"LOF scores seed {seed}", ours_scores, their_scores,
                                         protocol="scclip", detail="clip/model.py lof_pytorch(n_neighbors=30) vs "
                                         "ovseg lof_scores; 196 random 768-d tokens, 6 scaled by 8, fp32"))
            records.append(label_record("SC-CLIP", f"anomaly tokens seed {seed}", ours_mask, theirs_mask,
                                        protocol="scclip", detail=f"lof_pytorch contamination 0.05 vs ovseg "
                                        f"anomaly_tokens: {int(theirs_mask.sum())} anomalies in the reference"))
            # mean_interpolation is a method that reads nothing of the instance
            top_indices = [(int(i) // 14, int(i) % 14) for i in their_indices]
            feature_map = tokens.T.reshape(1, 768, 14, 14)
            theirs = model.VisionTransformer.mean_interpolation(None, feature_map, top_indices)
            ours = resolve_anomalies(tokens[None], theirs_mask[None], (14, 14))
            records.append(tensor_record("SC-CLIP", f"anomalies resolved seed {seed}",
                                         ours.transpose(1, 2).reshape(1, 768, 14, 14), theirs, protocol="scclip",
                                         detail="VisionTransformer.mean_interpolation vs ovseg resolve_anomalies"))
    return records


def dense_records(ref_dir: Path, device: str, work_dir: Path) -> list[ParityRecord]:
    """Their self-calibrated patch tokens (``encode_image(x, return_all=True)``) against ovseg's
    ``encode_tokens(x)[:, 1:]`` under the protocol's dense options, on :data:`DENSE_SIZES`."""
    from ovseg.eval.evaluator import dense_options
    from ovseg.parity.common import OVSegScorer

    folder = fp16_exact_clip(work_dir, small_text=True)
    weights = folder / "open_clip_pytorch_model.bin"
    records = []
    with HARNESS.reference_context(ref_dir):
        ref = HARNESS.open_reference(ref_dir, device)
        net = ref.segmentor("context60", weights).net
        method = scclip_method(folder, HARNESS.variants[0]).to(device).eval()
        settings = OVSegScorer(method, "scclip", device=device).evaluator.settings_for(None)
        for size_name, (h, w) in DENSE_SIZES.items():
            image = torch.from_numpy(generated_image(h, w, seed=h + w)).permute(2, 0, 1)[None].float() / 255
            x = method.encoder.normalize(image.to(device))
            with torch.no_grad(), dense_options(method, settings):
                ours = method.encoder.encode_tokens(x)[:, 1:]
                theirs = net.encode_image(x, return_all=True)
            records.append(tensor_record(
                "SC-CLIP", f"dense tokens {size_name}", ours, theirs, protocol="scclip",
                detail=f"{ours.shape[1]} patch tokens after ln_post/proj, fp32 CPU; their VisionTransformer.forward "
                       f"(return_all=True), pre_adjust_idx 8, post_adjust_idx 3, multi 3..9, res_cls 0.3; ovseg "
                       f"SCCLIP (SelfCalibration defaults); "
                       f"pos_embed_interpolation={settings.pos_embed_interpolation}"))
    return records


def run(ref_dir: Path, device: str = "cpu", work_dir: Path = Path("outputs/parity"), datasets=None, image_sizes=None,
        full_text: bool = True, **kwargs) -> list[ParityRecord]:
    records = component_records(ref_dir, device) + dense_records(ref_dir, device, Path(work_dir))
    datasets = tuple(datasets or ("voc21", *HARNESS.label_datasets))
    others = tuple(d for d in datasets if d != "voc21")
    if others:
        records += run_harness(HARNESS, ref_dir, device, work_dir, datasets=others, image_sizes=image_sizes,
                               full_text=full_text, dense=False, **kwargs)
    if "voc21" in datasets:
        records += run_harness(HARNESS, ref_dir, device, work_dir, datasets=("voc21",),
                               image_sizes=image_sizes or VOC21_SIZES, full_text=full_text and not others,
                               dense=False, inputs=not others, **kwargs)
    return records
