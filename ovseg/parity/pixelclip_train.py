"""PixelCLIP *training* parity: one whole training step of the authors' released detectron2 code against ovseg's.

The authors' **unmodified** ``pixelclip/pixelclip.py`` (with ``modeling/heads``, ``modeling/transformer`` and
``third_party/clip.py``/``model.py``) and ``train_net.py``'s ``Trainer.build_optimizer`` are imported from a
checkout with the detectron2 stand-ins of :mod:`ovseg.parity.detectron2_stubs`. Their model is built from their
``configs/pixelclip_vit_base.yaml`` (train_net.py ``setup``: defaults, ``add_pixelclip_config``, the YAML) on random
OpenAI-layout CLIP weights; ovseg's ``PixelCLIP`` is built from ``configs/pixelclip_vitb16_sa1b.yaml`` and given
their state dict (student, prompts, ConvHead, teacher) through ``ovseg.tools.weights.map_official_key``.

Both sides get the same batch (uint8 weak and strong views and bool masks, bypassing the data mappers). The EMA
teacher's trainable parameters start perturbed (as after some training) so the EMA update is visible. Their step
is detectron2's ``SimpleTrainer.run_step`` (detectron2/engine/train_loop.py: loss = sum of the loss dict,
zero_grad, backward, ``optimizer.step()`` — the full-model gradient clipping lives in their optimizer's step);
ours is one ``lightning.Trainer.fit`` step with the YAML's trainer settings (gradient clipping by norm).

Compared: loss, gradients of every trained parameter (before clipping), the Sinkhorn soft assignment, the hard
assignment and the merged cluster targets, the updated student parameters (the step's change), the EMA teacher
after the step, and each trained parameter's learning rate and weight decay in the optimizer.

Stand-ins at run time (no file of the checkout is changed): ``third_party.clip.load`` builds their CLIP with the
checkout's own ``build_model`` from the random state dict instead of downloading OpenAI's JIT file (what ``load``
does with ``jit=False``); ``Tensor.cuda`` moves to the chosen device (their predictor calls ``.cuda()``); the
class-name JSONs are two-class files (the text features they feed are not used in training).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ovseg.parity.common import (TRAINING_TOLERANCE, ParityRecord, generated_image, git_commit, label_record,
                                 max_rel_diff, random_openai_clip, reference_imports, stub_module, tensor_record)
from ovseg.utils.project import project_path

__all__ = ["training_records", "reference_pixelclip", "ovseg_pixelclip", "training_batch", "SMALL_VIT"]

REFERENCE = "PixelCLIP"
REFERENCE_CONFIG = "configs/pixelclip_vit_base.yaml"
OVSEG_CONFIG = project_path("configs/pixelclip_vitb16_sa1b.yaml")
#: a small ViT in the OpenAI layout (64-wide heads, as OpenAI's ``build_model`` assumes) for quick runs
SMALL_VIT = "parity-vit-small"
_SMALL_VIT_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 224, "patch_size": 16, "width": 128, "head_width": 64, "layers": 3},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}
PROTOCOL = "pixelclip-train"


def _register_small_vit(work_dir: Path) -> None:
    import open_clip

    if SMALL_VIT in open_clip.list_models():
        return
    path = Path(work_dir) / f"{SMALL_VIT}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_SMALL_VIT_CONFIG))
    open_clip.add_model_config(path)


@contextlib.contextmanager
def _cuda_to(device: str) -> Iterator[None]:
    """``Tensor.cuda()`` (called unconditionally in their predictor) moves to ``device`` instead."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self.to(device)  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def _package_stub(ref_dir: Path):
    """``pixelclip`` as a bare package over the checkout's folder: its submodules are the real files, but its
    ``__init__`` (dataset registration that lists the SA-1B folder, the data mappers) is not run. The names
    ``train_net.py`` imports from it are set after the real ``pixelclip.config`` is imported."""
    from ovseg.parity.detectron2_stubs import Unused

    package = stub_module("pixelclip", **{n: type(n, (Unused,), {}) for n in (
        "DETRPanopticDatasetMapper", "MaskFormerPanopticDatasetMapper", "MaskFormerSemanticDatasetMapper",
        "SamBaselineDatasetMapperJSON")})
    package.__path__ = [str(Path(ref_dir).resolve() / "pixelclip")]
    return package


def reference_pixelclip(ref_dir: Path, weights: Path, work_dir: Path, device: str = "cpu",
                        opts: list | None = None) -> tuple[torch.nn.Module, Any, Any, Any]:
    """(their model, their optimizer, cfg, train_net's ``Trainer.build_optimizer``), built in the stand-ins."""
    from ovseg.parity.detectron2_stubs import detectron2_modules

    ref_dir = Path(ref_dir).resolve()
    work_dir = Path(work_dir)
    classes = work_dir / "two_classes.json"
    classes.write_text(json.dumps(["wall", "person"]))
    stubs = detectron2_modules()
    package = _package_stub(ref_dir)
    stubs["pixelclip"] = package
    try:
        with reference_imports(ref_dir, stubs), _cuda_to(device):
            clip = importlib.import_module("pixelclip.third_party.clip")

            def load(name, device="cpu", jit=True, prompt_depth=0, prompt_length=0):
                # stand-in for the download + torch.jit.load: the JIT file's state dict is the OpenAI layout plus
                # three scalars that build_model deletes
                state = torch.load(weights, map_location="cpu", weights_only=True)
                grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
                state["input_resolution"] = torch.tensor(grid * state["visual.conv1.weight"].shape[-1])
                state["context_length"] = torch.tensor(state["positional_embedding"].shape[0])
                state["vocab_size"] = torch.tensor(state["token_embedding.weight"].shape[0])
                return clip.build_model(state, prompt_depth, prompt_length).to(device), None

            clip.load = load
            importlib.import_module("pixelclip.modeling")  # registers PixelCLIPHead
            package.add_pixelclip_config = importlib.import_module("pixelclip.config").add_pixelclip_config
            importlib.import_module("pixelclip.pixelclip")  # registers PixelCLIP
            train_net = importlib.import_module("train_net")
            d2_config, d2_modeling = sys.modules["detectron2.config"], sys.modules["detectron2.modeling"]

            # train_net.py setup(): defaults (+ add_deeplab_config: only LR-schedule keys, not used here),
            # add_pixelclip_config, the YAML, the command-line opts
            cfg = d2_config.get_cfg()
            package.add_pixelclip_config(cfg)
            cfg.merge_from_file(str(ref_dir / REFERENCE_CONFIG))
            cfg.merge_from_list(["MODEL.SEM_SEG_HEAD.TRAIN_CLASS_JSON", str(classes),
                                 "MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON", str(classes), *(opts or [])])
            model = d2_modeling.build_model(cfg).to(torch.device(device))  # DefaultTrainer.build_model
            build_optimizer = train_net.Trainer.build_optimizer
            optimizer = build_optimizer(cfg, model)
    finally:
        for name in [n for n in sys.modules if n == "pixelclip" or n.startswith("pixelclip.") or n == "train_net"]:
            del sys.modules[name]
    return model, optimizer, cfg, build_optimizer


def ovseg_pixelclip(weights: Path, model_name: str, reference_state: dict[str, torch.Tensor],
                    overrides: dict[str, Any] | None = None):
    """ovseg's PixelCLIP from ``configs/pixelclip_vitb16_sa1b.yaml`` on ``weights``, then given the reference's
    state dict (student, prompts, ConvHead, teacher) by the checkpoint converter's key map."""
    from ovseg.methods.pixelclip import PixelCLIP
    from ovseg.models.clip import CLIPConfig
    from ovseg.tools.weights import map_official_key
    from ovseg.utils.cli_args import read_lightning_config

    config = read_lightning_config(OVSEG_CONFIG)  # its trainer block is configs/trainer/pixelclip_4gpu.yaml
    kwargs = dict(config["model"]["init_args"])
    clip = {**kwargs.pop("clip"), "name": model_name, "pretrained": str(weights), "quick_gelu": True}
    kwargs.update(max_steps=config["trainer"]["max_steps"], **(overrides or {}))
    model = PixelCLIP(clip=CLIPConfig(**clip), **kwargs)
    target = model.state_dict()
    converted, unmatched = {}, []
    for key, value in reference_state.items():
        new = map_official_key(key)
        if new is None:
            continue
        if new in target and target[new].shape == value.shape:
            converted[new] = value
        else:
            unmatched.append(key)
    missing = [k for k in target if k not in converted]
    if unmatched or missing:
        raise RuntimeError(f"reference -> ovseg state: unmatched {unmatched[:5]}, missing {missing[:5]}")
    model.load_state_dict(converted)
    return model, config["trainer"]


def training_batch(batch_size: int = 2, size: int = 640, seed: int = 0) -> dict[str, Any]:
    """Weak views (generated images), strong views (the weak ones colour-shifted, a cutout box set to 0) and
    per-image bool masks (ellipses and boxes of many sizes, a one-pixel mask that is dropped at 256², the cutout
    removed from the masks as the mapper does)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    weak, strong, masks = [], [], []
    for b in range(batch_size):
        image = generated_image(size, size, seed + b)
        shifted = np.clip(image.astype(np.float32) * rng.uniform(0.6, 1.2, 3) + rng.uniform(-30, 30, 3), 0, 255)
        shifted = shifted.round().astype(np.uint8)
        y0, x0 = rng.integers(0, size // 2, 2)
        h, w = rng.integers(size // 10, size // 2, 2)
        shifted[y0:y0 + h, x0:x0 + w] = 0
        image_masks = []
        for _ in range(int(rng.integers(10, 16))):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(0.02, 0.4, 2) * size
            if rng.random() < 0.5:
                m = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
            else:
                m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            image_masks.append(m)
        tiny = np.zeros((size, size), bool)
        tiny[size // 2, size // 2] = True
        image_masks.append(tiny)
        stack = np.stack(image_masks)
        stack[:, y0:y0 + h, x0:x0 + w] = False
        stack = stack[stack.reshape(len(stack), -1).any(1)]
        stack = stack[np.argsort(-stack.reshape(len(stack), -1).sum(1), kind="stable")]  # largest first
        weak.append(torch.from_numpy(image).permute(2, 0, 1).contiguous())
        strong.append(torch.from_numpy(shifted).permute(2, 0, 1).contiguous())
        masks.append(torch.from_numpy(stack))
    return {"image": torch.stack(weak), "image_strong": torch.stack(strong), "masks": masks}


class _Recorder:
    """Wraps a callable; keeps what it returned (detached copies)."""

    def __init__(self, func):
        self.func, self.outputs = func, []

    def __call__(self, *args, **kwargs):
        out = self.func(*args, **kwargs)
        self.outputs.append(out)
        return out


def _reference_step(model, optimizer, batch: dict[str, Any], device: str) -> dict[str, Any]:
    """detectron2/engine/train_loop.py ``SimpleTrainer.run_step`` on their model, recording what we compare."""
    inputs = _reference_inputs(batch)
    sinkhorn = _Recorder(model.distributed_sinkhorn)
    clusters = _Recorder(model.prepare_clusters)
    model.distributed_sinkhorn, model.prepare_clusters = sinkhorn, clusters
    model.train()
    loss_dict = model(inputs)
    losses = sum(loss_dict.values())
    optimizer.zero_grad()
    losses.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    del model.distributed_sinkhorn, model.prepare_clusters
    return {"loss": losses.detach(), "grads": grads, "sinkhorn": sinkhorn.outputs[0].detach(),
            "targets": clusters.outputs[0].detach()}


def _ovseg_step(model, trainer_cfg: dict[str, Any], batch: dict[str, Any], device: str) -> dict[str, Any]:
    """One ``lightning.Trainer.fit`` step of ovseg's PixelCLIP with the YAML's gradient clipping and precision."""
    import lightning as L

    import ovseg.methods.pixelclip.method as pixelclip_model

    record: dict[str, Any] = {}

    class Probe(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            record["grads"] = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()
                               if p.grad is not None}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            record["loss"] = outputs["loss"].detach().clone()

    loader = torch.utils.data.DataLoader([batch], batch_size=None, collate_fn=lambda x: x)
    trainer = L.Trainer(accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1, max_steps=1,
                        precision=trainer_cfg.get("precision", "32-true"),
                        gradient_clip_val=trainer_cfg.get("gradient_clip_val"),
                        gradient_clip_algorithm=trainer_cfg.get("gradient_clip_algorithm"),
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[Probe()])
    sinkhorn = _Recorder(pixelclip_model.distributed_sinkhorn)
    clusters = _Recorder(pixelclip_model.cluster_targets)
    pixelclip_model.distributed_sinkhorn, pixelclip_model.cluster_targets = sinkhorn, clusters
    try:
        trainer.fit(model, train_dataloaders=loader)
    finally:
        pixelclip_model.distributed_sinkhorn, pixelclip_model.cluster_targets = sinkhorn.func, clusters.func
    record.update(sinkhorn=sinkhorn.outputs[0].detach(), targets=clusters.outputs[0][0].detach(),
                  optimizer=trainer.optimizers[0])
    return record


def _reference_inputs(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """The mapper's per-image dicts: uint8 ``image``, float ``image_strong`` (its cutout returns a float tensor), the
    masks as a bool tensor (their ``prepare_clusters`` takes a tensor as it is; ``Instances.gt_masks.tensor`` of
    the mapper is the same bool stack)."""
    return [{"image": batch["image"][i], "image_strong": batch["image_strong"][i].float(),
             "instances": batch["masks"][i]} for i in range(len(batch["image"]))]


def _step_on_gradients(theirs, ours, grads: dict[str, torch.Tensor], names: dict[str, str], build_optimizer, cfg,
                       trainer_cfg: dict[str, Any]) -> tuple[dict, dict]:
    """One optimizer step of each side from the same parameters and the same (their) gradients: their
    ``build_optimizer`` (AdamW, per-parameter groups, full-model clipping inside ``step``) against ovseg's
    ``configure_optimizers`` with Lightning's own gradient clipping (``Precision.clip_gradients``)."""
    from lightning.pytorch.plugins.precision import Precision

    # float64: θ₁−θ₀ is ~lr (2e-6) while θ is ~1e-2, so in float32 one ulp of θ₁ is ~1e-3 of the update and the
    # two sides' update order (their per-parameter groups, the clipping norm's summation order) shows as noise
    theirs, ours = theirs.double(), ours.double()
    their_params = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    our_params = dict(ours.named_parameters())
    for n, p in their_params.items():
        p.grad = grads[n].clone().to(p)
        our_params[names[n]].grad = grads[n].clone().to(our_params[names[n]])
    before = {n: p.detach().clone() for n, p in their_params.items()}
    build_optimizer(cfg, theirs).step()
    optimizer = ours.configure_optimizers()["optimizer"]
    Precision().clip_gradients(optimizer, clip_val=trainer_cfg.get("gradient_clip_val") or 0.0,
                               gradient_clip_algorithm=trainer_cfg.get("gradient_clip_algorithm") or "norm")
    optimizer.step()
    return ({n: (p.detach() - before[n]).cpu() for n, p in their_params.items()},
            {n: (our_params[names[n]].detach() - before[n]).cpu() for n in their_params})


def _optimizer_settings(optimizer, params: dict[str, torch.Tensor], lr_key: str) -> dict[str, tuple]:
    by_id = {id(p): n for n, p in params.items()}
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in by_id:
                out[by_id[id(p)]] = (group.get(lr_key, group["lr"]), group["weight_decay"], tuple(group["betas"]),
                                     group["eps"], group.get("amsgrad", False))
    return out


def training_records(ref_dir: Path, device: str = "cpu", work_dir: Path | None = None, *,
                     model_name: str = "ViT-B-16", batch_size: int = 2, image_size: int = 640,
                     seed: int = 0) -> list[ParityRecord]:
    """The training-step records (see the module docstring). ``model_name``: an open_clip ViT name with 64-wide
    heads (``ViT-B-16``, the paper's; ``parity-vit-small`` for quick runs), random weights on both sides."""
    from ovseg.tools.weights import map_official_key

    started = time.perf_counter()
    work_dir = Path(work_dir or "parity_work") / "pixelclip_train"
    work_dir.mkdir(parents=True, exist_ok=True)
    if model_name == SMALL_VIT:
        _register_small_vit(work_dir)
    weights = random_openai_clip(work_dir / f"random_{model_name}.pt", model_name, seed=seed)
    torch.manual_seed(seed)
    theirs, their_optimizer, cfg, build_optimizer = reference_pixelclip(ref_dir, weights, work_dir, device)

    # teacher = student with its trainable parameters moved (as after some steps), on their side first
    generator = torch.Generator().manual_seed(seed + 1)
    student_visual = dict(theirs.sem_seg_head.predictor.clip_model.visual.named_parameters())
    with torch.no_grad():
        for name, param in theirs.teacher_encoder.visual.named_parameters():
            if student_visual[name].requires_grad:
                noise = torch.randn(param.shape, generator=generator).to(param)
                param.add_(noise * 0.02 * param.abs().mean().clamp_min(1e-3))
    state = {k: v.detach().clone() for k, v in theirs.state_dict().items()}
    ours, trainer_cfg = ovseg_pixelclip(weights, model_name, state)
    ours = ours.to(device)

    their_params = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    our_params = dict(ours.named_parameters())
    names = {n: map_official_key(n) for n in their_params}
    our_trained = {n for n, p in our_params.items() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in their_params.items()}
    teacher_before = {n: p.detach().clone() for n, p in theirs.teacher_encoder.visual.named_parameters()}

    batch = training_batch(batch_size, image_size, seed)
    on_device = {k: (v.to(device) if torch.is_tensor(v) else [m.to(device) for m in v]) for k, v in batch.items()}
    theirs0, ours0 = copy.deepcopy(theirs), copy.deepcopy(ours)  # the state before the step, for the checks below
    ref = _reference_step(theirs, their_optimizer, on_device, device)
    out = _ovseg_step(ours, trainer_cfg, batch, device)
    ours = ours.to(device)

    size = "ViT-B/16 (the paper's)" if model_name == "ViT-B-16" else f"{model_name} {_SMALL_VIT_CONFIG}"
    common = (f"{size}, random weights seed {seed}, fp32 on {device}; batch {batch_size}×{image_size}²; checkout "
              f"{git_commit(Path(ref_dir))[:12]}; their {REFERENCE_CONFIG} vs ovseg {OVSEG_CONFIG.name}")
    records: list[ParityRecord] = []

    def add(record: ParityRecord) -> None:
        records.append(record)

    # which parameters train
    ours_mapped = {names[n] for n in their_params}
    same_set = ours_mapped == our_trained
    add(ParityRecord(REFERENCE, "trained parameters (same set)", PROTOCOL, passed=same_set,
                     detail=f"{len(their_params)} theirs, {len(our_trained)} ours"
                     + ("" if same_set else f"; only theirs {sorted(ours_mapped - our_trained)[:4]}, only ours "
                        f"{sorted(our_trained - ours_mapped)[:4]}")))

    add(tensor_record(REFERENCE, "training loss", out["loss"], ref["loss"], protocol=PROTOCOL,
                      tolerance=TRAINING_TOLERANCE, detail=f"loss {float(ref['loss']):.6f}; {common}"))

    # gradients, by part of the model
    parts = {"gradients: visual attention (q,k,v,out)": lambda n: ".attn." in n,
             "gradients: visual positional embedding": lambda n: n.endswith("visual.positional_embedding"),
             "gradients: prompt tokens": lambda n: n.endswith("prompt_tokens"),
             "gradients: ConvHead decoder": lambda n: n.startswith("head.")}
    for quantity, select in parts.items():
        selected = [n for n in their_params if select(n)]
        worst, worst_name = 0.0, ""
        for n in selected:
            theirs_grad = ref["grads"].get(n)
            ours_grad = out["grads"].get(names[n])
            if theirs_grad is None or ours_grad is None:
                worst, worst_name = float("inf"), f"{n} has no gradient on " + ("their" if theirs_grad is None
                                                                               else "our") + " side"
                break
            diff = max_rel_diff(ours_grad, theirs_grad)
            if diff > worst or not worst_name:
                worst, worst_name = diff, n
        add(ParityRecord(REFERENCE, quantity, PROTOCOL, max_rel_diff=worst, tolerance=TRAINING_TOLERANCE,
                         passed=bool(selected) and worst <= TRAINING_TOLERANCE,
                         detail=f"max over {len(selected)} parameters of max|Δ|/max|theirs| per parameter "
                                f"(worst: {worst_name}); before clipping"))

    add(tensor_record(REFERENCE, "Sinkhorn soft assignment", out["sinkhorn"], ref["sinkhorn"], protocol=PROTOCOL,
                      tolerance=TRAINING_TOLERANCE, detail=f"{ref['sinkhorn'].shape[0]} masks × "
                      f"{ref['sinkhorn'].shape[1]} clusters (3 Sinkhorn iterations, eps {cfg.MODEL.EPS})"))
    add(label_record(REFERENCE, "hard assignment (argmax)", out["sinkhorn"].argmax(-1), ref["sinkhorn"].argmax(-1),
                     protocol=PROTOCOL, agreement=1.0, detail="share of masks given the same cluster"))
    add(label_record(REFERENCE, "cluster targets", out["targets"].cpu(), ref["targets"].cpu(), protocol=PROTOCOL,
                     agreement=1.0, detail="merged 0/1 targets [B, K, 256, 256]"))

    # the step's change of the student (AdamW + clipping + weight decay) and of the EMA teacher
    # AdamW's first step is ≈ lr·sign(g) where |g| ≫ eps (1e-8) and steepest where |g| ≈ eps: there a 1e-5
    # relative gradient difference moves the update by ~25 %, so the whole step's change is compared where the
    # clipped gradient is ≥ 100·eps, and the optimizer alone on identical gradients below (all elements)
    scale = min(1.0, cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE / float(torch.cat(
        [g.flatten() for n, g in ref["grads"].items() if n in their_params]).norm()))
    worst, kept, total = 0.0, 0, 0
    for n, p in their_params.items():
        theirs_delta = (p.detach() - before[n]).cpu()
        ours_delta = our_params[names[n]].detach().cpu() - before[n].cpu()
        well = (ref["grads"][n].cpu().abs() * scale) >= 1e-6
        kept, total = kept + int(well.sum()), total + well.numel()
        if well.any():
            worst = max(worst, float((ours_delta - theirs_delta)[well].abs().max() / theirs_delta.abs().max()))
    add(ParityRecord(REFERENCE, "parameter update of the whole step", PROTOCOL, max_rel_diff=worst,
                     tolerance=TRAINING_TOLERANCE, passed=worst <= TRAINING_TOLERANCE,
                     detail=f"θ₁−θ₀ at the {kept}/{total} elements whose clipped gradient is ≥ 100·AdamW eps; "
                            f"clipping {cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE} {cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE} vs "
                            f"Lightning gradient_clip_val {trainer_cfg.get('gradient_clip_val')}"))
    theirs_step, ours_step = _step_on_gradients(copy.deepcopy(theirs0), copy.deepcopy(ours0), ref["grads"], names,
                                                build_optimizer, cfg, trainer_cfg)
    worst = max(max_rel_diff(ours_step[n], theirs_step[n]) for n in theirs_step)
    add(ParityRecord(REFERENCE, "optimizer step on identical gradients", PROTOCOL, max_rel_diff=worst,
                     tolerance=TRAINING_TOLERANCE, passed=worst <= TRAINING_TOLERANCE,
                     detail="θ₁−θ₀ of every trained tensor, all elements, in float64: their build_optimizer "
                            "(+ full-model clipping in step) vs ovseg configure_optimizers + Lightning's "
                            "clip_gradients"))
    our_teacher = dict(ours.teacher.model.visual.named_parameters())
    teacher_theirs = dict(theirs.teacher_encoder.visual.named_parameters())
    moved = [n for n in teacher_before if student_visual[n].requires_grad]
    worst_delta = max(max_rel_diff(our_teacher[n].detach().cpu() - teacher_before[n].cpu(),
                                   teacher_theirs[n].detach().cpu() - teacher_before[n].cpu()) for n in moved)
    worst_value = max(max_rel_diff(our_teacher[n].detach(), teacher_theirs[n].detach()) for n in teacher_before)
    worst = max(worst_delta, worst_value)
    add(ParityRecord(REFERENCE, "EMA teacher after the step", PROTOCOL, max_rel_diff=worst,
                     tolerance=TRAINING_TOLERANCE, passed=worst <= TRAINING_TOLERANCE,
                     detail=f"EMA change θ_t−θ_t0 of the {len(moved)} trainable tensors (max rel {worst_delta:.2e}; "
                            f"the teacher started with them perturbed) and values of all {len(teacher_before)} "
                            f"(max rel {worst_value:.2e}; their EMA also runs over frozen tensors, 0.999·p+0.001·p "
                            f"moves them by ≤ 1 ulp, ovseg skips them)"))

    # optimizer settings per trained parameter
    theirs_opt = _optimizer_settings(their_optimizer, their_params, "lr")
    ours_opt = _optimizer_settings(out["optimizer"], our_params, "initial_lr")
    for index, quantity in ((0, "optimizer: learning rate per parameter"),
                            (1, "optimizer: weight decay per parameter")):
        differ = [n for n in their_params if names[n] not in ours_opt or n not in theirs_opt
                  or not np.isclose(ours_opt[names[n]][index], theirs_opt[n][index], rtol=1e-12, atol=0)]
        values = sorted({theirs_opt[n][index] for n in theirs_opt})
        add(ParityRecord(REFERENCE, quantity, PROTOCOL, passed=not differ,
                         detail=(f"all {len(their_params)} equal; theirs take {values}" if not differ else
                                 f"{len(differ)} differ, e.g. " + ", ".join(
                                     f"{n}: ours {ours_opt.get(names[n], ('-', '-'))[index]} theirs "
                                     f"{theirs_opt.get(n, ('-', '-'))[index]}" for n in differ[:3]))))
    other = [n for n in their_params if names[n] in ours_opt and ours_opt[names[n]][2:] != theirs_opt[n][2:]]
    first = theirs_opt[next(iter(theirs_opt))][2:]
    add(ParityRecord(REFERENCE, "optimizer: AdamW betas, eps, amsgrad", PROTOCOL, passed=not other,
                     detail=f"{len(other)} differ" if other else f"all equal: {first}"))
    elapsed = time.perf_counter() - started
    for r in records:
        r.detail = (r.detail + f" [{elapsed:.0f}s]") if r is records[0] else r.detail
    return records
