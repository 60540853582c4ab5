"""Parity of one MaskCLIP+ training step with MaskCLIP's released code (github.com/chongzhou96/MaskCLIP):
``mmseg/models/decode_heads/maskclip_plus_head.py`` (``MaskClipPlusHead``: the frozen CLIP teacher's pseudo
labels, ``cls_seg``, the loss), ``aspp_headv2.py``, mmseg's ``ResNetV1c`` and ``EncoderDecoder.forward_train``,
built from ``configs/maskclip_plus/anno_free/maskclip_plus_vit16_deeplabv2_r101-d8_512x512_2k_voc12aug_20.py``.

Both sides hold the same random weights: the teacher's CLIP (the fp16-grid random ViT-B/16 of the MaskCLIP rows,
converted by the checkout's ``convert_clip_weights.py``) and the student (the reference's random ResNet-50-V1c +
ASPP-v2, copied into ovseg's :class:`~ovseg.models.deeplab.DeepLabResNet`), and the same text embeddings (the
checkout's ``prompt_engineering.zeroshot_classifier`` output, loaded into ovseg's fixed classifier; the text
encoders are compared by the MaskCLIP rows). Two padded crops (one image smaller than the crop) go through one
training step on each side; compared: the pseudo labels (identical), the student's class scores, the loss and
every student gradient (<= 1e-4 relative).

Changes to the reference config, each for running on one CPU process: ``SyncBN`` -> ``BN`` (the same in one process),
``pretrained=None`` (no ImageNet download: random student on both sides), the head's ``device='cuda'`` tensors and
``torch.load(map_location='cuda')`` mapped to the run's device. Imports and stand-ins are the MaskCLIP rows'
(:mod:`ovseg.parity.maskclip`).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator

import torch

from ovseg.parity import maskclip as maskclip_parity
from ovseg.parity.common import (TRAINING_TOLERANCE, ParityRecord, RecordLog, generated_image, image_tensor,
                                 label_record, reference_imports, tensor_record)

REFERENCE = "MaskCLIP+"
#: a training step, not an evaluation protocol: a failure here marks no protocol
PROTOCOLS: tuple[str, ...] = ()
CONFIG = "configs/maskclip_plus/anno_free/maskclip_plus_vit16_deeplabv2_r101-d8_512x512_2k_voc12aug_20.py"
#: crop side of the compared step (the config's 512 works too, ~10x slower on a CPU); batch of two crops, the
#: second image smaller than the crop (padding)
CROP = 224
#: (ks_thresh, pd_thresh) of the teacher: the released anno-free configs (off), and the ``kspd`` configs'
#: ``configs/maskclip_plus/anno_free/maskclip_plus_kspd_vit16_*.py`` (key smoothing 1.0, prompt denoising 0.5)
TEACHER_SETTINGS = ((0.0, 0.0), (1.0, 0.5))


@contextlib.contextmanager
def _cuda_tensors_on(device: str) -> Iterator[None]:
    """``torch.tensor(..., device='cuda')`` (MaskClipPlusHead.__init__) makes the tensor on ``device``."""
    saved = torch.tensor

    def tensor(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = device
        return saved(*args, **kwargs)

    torch.tensor = tensor
    try:
        yield
    finally:
        torch.tensor = saved


def _bn(cfg) -> None:
    """SyncBN -> BN everywhere in a config (one process: the same statistics)."""
    if isinstance(cfg, dict):
        if cfg.get("type") == "SyncBN":
            cfg["type"] = "BN"
        for value in cfg.values():
            _bn(value)


def student_state_from_reference(model) -> dict[str, torch.Tensor]:
    """The reference's ``ResNetV1c`` + ``ASPPHeadV2`` weights in ovseg's ``DeepLabResNet`` names (``student.*``):
    ``stem.i`` -> the deep stem at ``body.0.i``, ``layerN`` -> ``body.{N+3}``, ASPP branch ``i``'s ``conv`` / ``bn``
    -> ``head.branches.i.0`` / ``.1``."""
    out = {}
    for key, value in model.backbone.state_dict().items():
        if key.startswith("stem."):
            out["student.body.0." + key[len("stem."):]] = value
        elif key.startswith("layer"):
            stage, rest = key.split(".", 1)
            out[f"student.body.{int(stage[len('layer'):]) + 3}.{rest}"] = value
    for key, value in model.decode_head.decode_module.aspp_modules.state_dict().items():
        branch, layer, rest = key.split(".", 2)
        out[f"student.head.branches.{branch}.{ {'conv': 0, 'bn': 1}[layer] }.{rest}"] = value
    return out


def _reference_grad_names(model) -> dict[str, torch.nn.Parameter]:
    """Reference student parameters by ovseg name."""
    named = {f"backbone.{k}": p for k, p in model.backbone.named_parameters()}
    named |= {f"aspp.{k}": p for k, p in model.decode_head.decode_module.aspp_modules.named_parameters()}
    out = {}
    for key, param in named.items():
        group, rest = key.split(".", 1)
        if group == "backbone":
            if rest.startswith("stem."):
                out["student.body.0." + rest[len("stem."):]] = param
            else:
                stage, tail = rest.split(".", 1)
                out[f"student.body.{int(stage[len('layer'):]) + 3}.{tail}"] = param
        else:
            branch, layer, tail = rest.split(".", 2)
            out[f"student.head.branches.{branch}.{ {'conv': 0, 'bn': 1}[layer] }.{tail}"] = param
    return out


def _capture_loss_inputs(head) -> dict[str, torch.Tensor]:
    """Wrap ``head.losses`` so each call leaves its class scores and final labels (pseudo labels, 255 ignored) in the
    returned dict."""
    captured: dict[str, torch.Tensor] = {}
    original = head.losses

    def losses(seg_logit, seg_label):
        captured["logits"], captured["labels"] = seg_logit.detach().clone(), seg_label.detach().clone()
        return original(seg_logit, seg_label)

    head.losses = losses
    return captured


def _crops(crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two crops in [0, 1] ``[2, 3, S, S]`` and their valid masks: a full one and one padded bottom/right."""
    images = torch.zeros(2, 3, crop, crop)
    valid = torch.zeros(2, crop, crop, dtype=torch.bool)
    for i, (h, w) in enumerate(((crop, crop), (crop * 3 // 4, crop - 40))):
        images[i, :, :h, :w] = image_tensor(generated_image(h, w, seed=11 + i))
        valid[i, :h, :w] = True
    return images, valid


def run(ref_dir: Path, device: str = "cpu", work_dir: Path = Path("outputs/parity"), *, crop: int = CROP,
        model_name: str = "ViT-B-16", classes: str = "voc20") -> list[ParityRecord]:
    """One MaskCLIP+ training step on both sides (see the module docstring); returns the records."""
    from ovseg.methods.maskclip_plus import MaskCLIPPlus
    from ovseg.models.clip import CLIPConfig
    from ovseg.models.text import get_templates

    started = time.time()
    ref_dir = Path(ref_dir).resolve()
    work_dir = Path(work_dir).resolve() / "maskclip_plus"
    work_dir.mkdir(parents=True, exist_ok=True)
    weights = maskclip_parity.fp16_grid_weights(work_dir, model_name)
    records = rec = RecordLog(started)


    images, valid = _crops(crop)
    with maskclip_parity._mmcv1(), reference_imports(ref_dir, maskclip_parity._stubs(ref_dir)):
        helper = maskclip_parity.Reference(ref_dir, weights, work_dir, device)
        names = helper.class_names(classes)
        text = helper.text_embeddings(names, get_templates("single"))
        text_path = helper.pretrain / f"{classes}_single_ViT16_clip_text.pth"
        torch.save(text.cpu(), text_path)

        from mmcv import Config

        import mmseg.models.backbones.resnet  # noqa: F401  (registers ResNetV1c)
        import mmseg.models.decode_heads.aspp_headv2  # noqa: F401
        import mmseg.models.decode_heads.maskclip_plus_head  # noqa: F401
        import mmseg.models.losses  # noqa: F401

        for ks_thresh, pd_thresh in TEACHER_SETTINGS:
            setting = f"ks {ks_thresh:g} / pd {pd_thresh:g}" if ks_thresh or pd_thresh else "plain teacher"
            step = f"training step, 2 crops {crop}x{crop}, {setting}"
            cfg = Config.fromfile(str(ref_dir / CONFIG))
            cfg.model.pretrained = None
            _bn(cfg.model)
            head_cfg = cfg.model.decode_head
            head_cfg.num_classes = head_cfg.text_categories = len(names)
            head_cfg.clip_unlabeled_cats = list(range(len(names)))
            head_cfg.text_embeddings_path = str(text_path)
            head_cfg.clip_weights_path = str(helper.pretrain / "ViT16_clip_weights.pth")
            head_cfg.ks_thresh, head_cfg.pd_thresh = ks_thresh, pd_thresh
            torch.manual_seed(0)
            with _cuda_tensors_on(device), maskclip_parity._torch_load_on(device):
                reference = helper._build_segmentor(cfg.model, train_cfg=cfg.get("train_cfg"),
                                                    test_cfg=cfg.get("test_cfg"))
                reference.init_weights()
            reference = reference.to(device).train()

            # ovseg: the same teacher CLIP file, the reference's student weights and text embeddings
            method = MaskCLIPPlus(clip=CLIPConfig(name=model_name, pretrained=str(weights), quick_gelu=True,
                                                  last_block="value"),
                                  classes=[n.strip() for n in names], train_templates="single",
                                  teacher_options={"ks_thresh": ks_thresh, "pd_thresh": pd_thresh})
            missing = method.load_state_dict(student_state_from_reference(reference), strict=False)
            student_missing = [k for k in missing.missing_keys if k.startswith("student.")
                               and not k.endswith("num_batches_tracked")]
            if student_missing:
                raise RuntimeError(f"student weights not copied from the reference: {student_missing[:5]}")
            method.class_text.copy_(text.to(method.class_text))
            method = method.to(device).train()

            # the reference step: EncoderDecoder.forward_train on the normalised, zero-padded crops, labels all
            # suppressed (-1) except the padding (255), as the anno-free pipeline hands them over
            normalised = (images.to(device) - method.student.mean) / method.student.std
            normalised = normalised * valid[:, None].to(device)
            gt = torch.where(valid, torch.tensor(-1), torch.tensor(255))[:, None].long().to(device)
            captured = _capture_loss_inputs(reference.decode_head)
            metas = [dict(img_shape=(crop, crop, 3), ori_shape=(crop, crop, 3), pad_shape=(crop, crop, 3),
                          flip=False)] * len(images)
            theirs = reference.forward_train(normalised, metas, gt)
            reference.zero_grad()
            theirs["decode.loss_ce"].backward()

            out = method.compute_loss(images.to(device), valid.to(device))
            method.zero_grad()
            out["loss"].backward()

            rec(label_record(REFERENCE, f"pseudo labels, {step}", out["targets"], captured["labels"][:, 0],
                             protocol=None, agreement=1.0,
                             detail=f"MaskCLIP teacher argmax at crop size, padding 255 (assign_label, clip=True); "
                                    f"{len(out['targets'].unique()) - 1} classes present"))
            rec(tensor_record(REFERENCE, f"student class scores, {step}", out["logits"].detach(), captured["logits"],
                              tolerance=TRAINING_TOLERANCE, detail="DeepLab-v2 R-50-V1c features . text (cls_seg)"))
            rec(tensor_record(REFERENCE, f"loss, {step}", out["loss"].detach(), theirs["decode.loss_ce"].detach(),
                              tolerance=TRAINING_TOLERANCE,
                              detail="CrossEntropyLoss, mean over all pixels (mmseg 0.x)"))
            grads = _reference_grad_names(reference)
            ours = dict(method.named_parameters())
            for group, prefix in (("backbone", "student.body."), ("ASPP-v2 head", "student.head.")):
                keys = [k for k in grads if k.startswith(prefix)]
                worst, worst_key = 0.0, ""
                for key in keys:
                    diff = tensor_record(REFERENCE, key, ours[key].grad, grads[key].grad).max_rel_diff
                    if diff >= worst:
                        worst, worst_key = diff, key
                rec(ParityRecord(REFERENCE, f"student gradients, {group}, {step}", None, max_rel_diff=worst,
                                 tolerance=TRAINING_TOLERANCE, passed=worst <= TRAINING_TOLERANCE,
                                 detail=f"{len(keys)} tensors, worst {worst_key}"))
    print(f"  MaskCLIP+ parity: {time.time() - started:.0f} s", flush=True)
    return records


__all__ = ["run", "student_state_from_reference", "REFERENCE", "PROTOCOLS"]
