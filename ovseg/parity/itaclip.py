"""ITACLIP (m-arda-aydn/ITACLIP) beside :class:`ovseg.methods.ITACLIP` under ovseg's ``itaclip`` protocol:
``itaclip_segmentor.py`` ``ITACLIP_Segmentor`` with its ``configs/cfg_*.py`` (per-dataset auxiliary texts and
``def_coefficient``, ``img_eng_coefficient``, logit scales, thresholds, stride 28, PAMR 10 steps) and its bundled
``clip/`` package (OpenAI's, with the self-self / intermediate-attention last block) on the same random weights.

Compared: the image tower's tokens (``encode_image(x, return_all=True, attn_self=True)``: every token after
``ln_post``/``proj``) against ovseg's ``encode_tokens``; the window logits of ``forward_feature`` (image engineering
on and off) against ovseg's ``dense_logits`` upsampled to the window; the text embeddings with the auxiliary texts
mixed in (their ``query_features``); the model input; and the label maps of ``predict`` on generated images under
the protocol.

Their segmentor loads weights by ``clip.load(model_name)`` (a file path works) and reads ``name_path`` /
``auxiliary_text_path`` relative to the folder above the checkout; :class:`ITACLIPReference` gives it the weights
file and the checkout's own files, and the ``device`` the run uses (the configs say ``'cuda:0'``; nothing else of
theirs names a device). Two of their steps hold the whole image's scores at once: the synonym max (``[classes,
queries, H, W]``) runs through their own ``width_chunk_size`` path (``perform_in_chunks``, the released COCO configs
use it too; exact, a per-pixel max), and their ``PAMR`` is called on chunks of score channels (their module,
unchanged, per chunk: every channel is refined on its own with the same image affinities). Their postprocess's
label closing is not per pixel, so it runs on the whole map (never in row blocks). The label maps run on
ViT-B/16's layout at width :data:`LABEL_VISION_WIDTH` (stride 28 and five views per window cost hours at width 768 on
a CPU); the tokens and window logits are compared at ViT-B/16's own width. Everything else is
:mod:`ovseg.parity.mmseg_clip`'s harness (stand-ins for ``mmseg``, fp16-exact random ViT-B/16 weights, mmcv's own
test pipeline). Both sides run fp32 on the CPU.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.parity.common import (
    IMAGE_SIZES,
    ParityRecord,
    generated_image,
    image_tensor,
    label_record,
    reference_imports,
    tensor_record,
)
from ovseg.parity.mmseg_clip import SMALL_TEXT, Harness, Reference, fp16_exact_clip, stand_ins

PROTOCOLS = ("itaclip",)
#: tokens and window logits at ViT-B/16's width: the protocol's window, and a larger non-square input whose sides are
#: not multiples of 16 (positional-embedding interpolation, the flipped views' dropped remainder rows/columns)
DENSE_SIZES: dict[str, tuple[int, int]] = {"224x224": (224, 224), "333x500": (333, 500)}
#: ovseg dataset -> ITACLIP's ``configs/cfg_<stem>.py``
CONFIG_STEMS = {"voc21": "voc21", "context60": "context60", "coco_object": "coco_object",
                "coco_stuff171": "coco_stuff164k", "cityscapes": "cityscapes"}
#: label maps of the committed run: VOC21 (background synonyms, probability and area thresholds, logit scale 60,
#: definitions), on every size, 2048x1024 included (a 672x336 model input: 85 windows of five views each)
LABEL_DATASETS = ("voc21",)
#: the label maps' image tower: ViT-B/16's layout (12 blocks, so that their hard-coded intermediate blocks exist; patch
#: 16, 224 input) at this width (2 heads). Stride 28 and five views make 425 window passes per side for one
#: 2048x1024 image; at ViT-B/16's width 768 the six sizes take hours on a CPU, at this width minutes. The tokens and
#: window logits are compared at width 768.
LABEL_VISION_WIDTH = 128
#: label-map sizes of the committed run: four of :data:`~ovseg.parity.common.IMAGE_SIZES` (the 2048x1024 one
#: included) and a square one; at stride 28 each image is 25 to 85 windows of five views on each side, so the
#: 2-core CPU run keeps to these (ADE- and COCO-shaped images resize to the VOC one's 336x448 model input anyway)
LABEL_SIZES: dict[str, tuple[int, int]] = {
    "voc 375x500": IMAGE_SIZES["voc 375x500"],
    "context 333x500": IMAGE_SIZES["context 333x500"],
    "odd 397x541": IMAGE_SIZES["odd 397x541"],
    "square 300x300": (300, 300),
    "cityscapes 1024x2048": IMAGE_SIZES["cityscapes 1024x2048"],
}
#: their synonym max in column chunks of this width (``width_chunk_size``; the COCO configs set their own)
WIDTH_CHUNK = 64
#: their PAMR on this many score channels at a time ([channels, 16, H, W] floats twice: 1 GB at 2048x1024)
PAMR_CHANNELS = 4

HARNESS = Harness(reference="ITACLIP", protocol="itaclip", segmentor=("itaclip_segmentor", "ITACLIP_Segmentor"),
                  configs=CONFIG_STEMS, variants=(), label_variant="", label_datasets=LABEL_DATASETS,
                  full_text_dataset="voc21")


class ChannelChunks(torch.nn.Module):
    """Their PAMR module called on chunks of :data:`PAMR_CHANNELS` score channels (``.to`` keeps the wrapper)."""

    def __init__(self, pamr: torch.nn.Module):
        super().__init__()
        self.pamr = pamr

    def forward(self, image: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.pamr(image, scores[:, c:c + PAMR_CHANNELS])
                          for c in range(0, scores.shape[1], PAMR_CHANNELS)], dim=1)


class ITACLIPReference(Reference):
    """The checkout's segmentor with the weights file as ``model_name``, its own class-name and auxiliary-text
    files, and the run's device."""

    def segmentor(self, dataset: str, weights: Path, **extra):
        model = dict(self.config(dataset).model)
        for key in ("type", "device"):
            model.pop(key, None)
        model["model_name"] = str(weights)
        model["name_path"] = str(self.ref_dir / "configs" / Path(model["name_path"]).name)
        model["auxiliary_text_path"] = str(self.ref_dir / "llama_generated_texts" /
                                           Path(model["auxiliary_text_path"]).name)
        model.setdefault("width_chunk_size", WIDTH_CHUNK)
        model.update(extra)
        seg = self.segmentor_class(device=torch.device(self.device), **model)
        if seg.pamr is not None:
            seg.pamr = ChannelChunks(seg.pamr)
        return seg.eval()

    def labels(self, seg, pipeline: list, image: np.ndarray, scratch: Path) -> torch.Tensor:
        data = self.prepare(seg, pipeline, image, scratch)
        with torch.no_grad():
            out = seg.predict(data["inputs"], data["data_samples"])
        return out[0].pred_sem_seg.data[0].cpu()


def ovseg_itaclip(folder: Path, **settings):
    from ovseg.methods.itaclip import ITACLIP
    from ovseg.models.clip import CLIPConfig

    return ITACLIP(CLIPConfig(name=f"local-dir:{folder}", pretrained=None, quick_gelu=True, residual="token",
                              ffn=False), **settings)


def run(ref_dir: Path, device: str = "cpu", work_dir: Path = Path("outputs/parity"),
        datasets: tuple[str, ...] | None = None, image_sizes: dict[str, tuple[int, int]] | None = None,
        dense: bool = True, **unused) -> list[ParityRecord]:
    from ovseg.eval.evaluator import dense_options
    from ovseg.eval.inference import protocol_resize
    from ovseg.parity.common import OVSegScorer

    started = time.time()
    where = "CPU" if str(device) == "cpu" else str(device).upper()  # the run's device, in the rows' details
    work_dir = Path(work_dir)
    datasets = tuple(datasets or LABEL_DATASETS)
    image_sizes = image_sizes or LABEL_SIZES
    dense_folder = fp16_exact_clip(work_dir, small_text=True)
    label_folder = fp16_exact_clip(work_dir, small_text=True, vision_width=LABEL_VISION_WIDTH)
    records: list[ParityRecord] = []

    def log(record: ParityRecord) -> None:
        value = record.max_rel_diff if record.max_rel_diff is not None else record.identical_share
        print(f"[ITACLIP] {record.quantity}: {value:.3g} ({time.time() - started:.0f} s)", flush=True)
        records.append(record)

    with reference_imports(ref_dir, stand_ins()):
        ref = ITACLIPReference(HARNESS, ref_dir, device)
        first = datasets[0]
        # the image tower as released (ViT-B/16's width): tokens and window logits
        if dense:
            method = ovseg_itaclip(dense_folder).to(device).eval()
            entry = OVSegScorer(method, "itaclip", device=device).entry(first)
            settings = entry.settings
            seg = ref.segmentor(first, dense_folder / "open_clip_pytorch_model.bin")
        for size_name, (h, w) in (DENSE_SIZES.items() if dense else ()):
            image = image_tensor(generated_image(h, w, seed=h + w))[None].to(device)
            x = method.encoder.normalize(image)
            with torch.no_grad(), dense_options(method, settings):
                ours = method.encoder.encode_tokens(x)
                theirs = seg.net.encode_image(x, return_all=True, attn_self=True, device=device)
            log(tensor_record(
                "ITACLIP", f"dense tokens {size_name}", ours, theirs, protocol="itaclip",
                detail=f"all {ours.shape[1]} tokens after ln_post/proj; their encode_image(return_all=True, "
                       f"attn_self=True) vs ovseg ITACLIP (self-self maps of the last block and blocks "
                       f"{list(method.intermediate_layers)}, token residual, no MLP); pos_embed_interpolation="
                       f"{settings.pos_embed_interpolation}; fp32 {where}"))
            for engineering in (True, False):
                seg.img_engineering = method.image_engineering = engineering
                with torch.no_grad(), dense_options(method, settings), method.scoring(first):
                    ours = method.dense_logits(image, entry.text)
                    ours = F.interpolate(ours, size=(h, w), mode="bilinear", align_corners=False)
                    theirs = seg.forward_feature(x, text_features=seg.query_features)
                views = (f"image engineering, img_eng_coefficient {method.image_coefficient}" if engineering
                         else "no image engineering")
                log(tensor_record(
                    "ITACLIP", f"window logits {'engineered' if engineering else 'plain'} {size_name}", ours, theirs,
                    protocol="itaclip",
                    detail=f"forward_feature ({views}; {first} text with auxiliary texts) vs ovseg dense_logits "
                           f"upsampled to the window; fp32 {where}"))
        if dense:
            del seg, method

        # label maps: ViT-B/16's layout at a narrower width (every window runs five views on both sides)
        method = ovseg_itaclip(label_folder).to(device).eval()
        scorer = OVSegScorer(method, "itaclip", device=device)
        weights = label_folder / "open_clip_pytorch_model.bin"

        with tempfile.TemporaryDirectory() as scratch:
            for dataset in datasets:
                seg = ref.segmentor(dataset, weights)
                entry = scorer.entry(dataset)
                s = entry.settings
                log(tensor_record(
                    "ITACLIP", f"text embeddings {dataset}", entry.text, seg.query_features, protocol="itaclip",
                    detail=f"{len(entry.vocabulary.queries)} names x 80 ImageNet templates mixed with "
                           f"{s.auxiliary_texts.format(dataset=dataset)} (weight {s.auxiliary_weight}); small "
                           f"random text tower {SMALL_TEXT}"))
                pipeline = ref.pipeline(dataset)
                for size_name, (h, w) in image_sizes.items():
                    image = generated_image(h, w, seed=7 * h + w)
                    if dataset == first:
                        theirs = ref.model_input(seg, pipeline, image, Path(scratch))
                        ours = method.encoder.normalize(protocol_resize(
                            image_tensor(image)[None].to(device), s.short_side, s.long_side_max, None,
                            s.resize_library, s.resize_rule))
                        log(tensor_record("ITACLIP", f"model input {size_name}", ours, theirs, protocol="itaclip",
                                          detail=f"their LoadImageFromFile + Resize + SegDataPreProcessor: "
                                                 f"{tuple(theirs.shape[-2:])}"))
                    theirs = ref.labels(seg, pipeline, image, Path(scratch))
                    ours = scorer.labels(dataset, image)
                    log(label_record(
                        "ITACLIP", f"labels {dataset} {size_name}", ours, theirs, protocol="itaclip",
                        detail=f"image tower width {LABEL_VISION_WIDTH} (ViT-B/16 layout); image engineering "
                               f"(img_eng_coefficient {method.image_coefficients.get(dataset)}); "
                               f"{s.mode} {s.crop}/{s.stride}, short side {s.short_side}, logit scale "
                               f"{s.logit_scale}, prob thd {s.prob_threshold}, area thd {s.area_threshold}, PAMR "
                               f"{s.pamr_steps} steps {s.pamr_dilations}, {s.label_closing}x{s.label_closing} "
                               f"closing; {torch.unique(theirs).numel()} classes in the reference map; fp32 {where}"))
                del seg
    print(f"[ITACLIP] compared in {time.time() - started:.0f} s", flush=True)
    return records
