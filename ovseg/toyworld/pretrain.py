"""Contrastive pretraining of the toy CLIP on toy-world (image, caption) pairs, on the CPU in minutes.

An unmodified open_clip model (``toyworld-vit``, ``ovseg/models/configs/toyworld-vit.json``) trained with
``open_clip.ClipLoss`` on the train split: images resized once to the model's input size, random
horizontal flips, and for every sample a freshly composed caption naming exactly the classes of its image
(random order, articles and template; see :func:`ovseg.toyworld.generate.make_caption`), so the text tower
sees each class name in many contexts. AdamW (open_clip's weight-decay grouping), linear warm-up, cosine
decay, ``logit_scale`` clamped at ln(100) as open_clip does.

Deterministic for a seed and thread count (``threads`` defaults to 1; the shipped weights were trained with
1 thread). The weights are written atomically as a safetensors state dict that open_clip loads as is
(``open_clip.create_model("toyworld-vit", pretrained=FILE)``); by default in fp16, with the rows of the
token embedding that no training caption uses set to zero (they never received a gradient, and zeros keep
the file small once compressed).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.toyworld.generate import make_caption, read_captions

__all__ = ["PretrainConfig", "pretrain", "load_split_images", "to_model_input"]


@dataclass
class PretrainConfig:
    model: str = "toyworld-vit"
    steps: int = 600
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 50
    #: final learning rate as a fraction of ``lr`` (cosine decay)
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 1
    #: train on the first N train images only (None: all)
    limit: int | None = None
    #: compose a new caption per sample from its class list (False: the caption stored in captions/train.jsonl)
    recaption: bool = True
    hflip: bool = True
    #: store fp16 weights with unused token-embedding rows zeroed (False: the fp32 state dict as trained)
    compact: bool = True
    log_every: int = 50


def load_split_images(root: str | Path, split: str, size: int, limit: int | None = None
                      ) -> tuple[list[str], torch.Tensor, list[list[str]], list[str]]:
    """(ids, images uint8 [N,3,size,size] resized for the model, class lists, stored captions) of a split."""
    from ovseg.data.seg_dataset import read_image

    records = read_captions(root, split)[:limit]
    image_dir = Path(root) / "VOCdevkit/VOC2012/JPEGImages"
    chunks = []
    for start in range(0, len(records), 256):
        batch = np.stack([read_image(image_dir / f"{r['id']}.jpg") for r in records[start:start + 256]])
        chunks.append(to_model_input(torch.from_numpy(batch).permute(0, 3, 1, 2), size))
    images = torch.cat(chunks) if chunks else torch.empty(0, 3, size, size, dtype=torch.uint8)
    return [r["id"] for r in records], images, [r["classes"] for r in records], [r["caption"] for r in records]


def to_model_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N,3,H,W] -> uint8 [N,3,size,size] (antialiased bilinear), the toy CLIP's input resolution."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # open_clip's training script: no decay for gains, biases and logit_scale
    def exclude(name: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay}]


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def compact_state_dict(model: torch.nn.Module, used_tokens: torch.Tensor, fp16: bool = True) -> dict[str, torch.Tensor]:
    """The state dict to ship: token-embedding rows never used in training zeroed, optionally in fp16."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    embedding = state["token_embedding.weight"]
    embedding[~used_tokens] = 0
    if fp16:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    return state


def save_weights(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a state dict atomically (``.safetensors`` or a ``torch.save`` file for other suffixes)."""
    from ovseg.utils.io import atomic_open

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        data = save(state, metadata=metadata)
        with atomic_open(path, "wb") as f:
            f.write(data)
    else:
        with atomic_open(path, "wb") as f:
            torch.save(state, f)


def pretrain(root: str | Path, out: str | Path, cfg: PretrainConfig | None = None,
             log: Callable[[str], None] | None = print) -> dict:
    """Train the toy CLIP on ``root``'s train split and write its weights to ``out``; returns a summary."""
    import open_clip

    import ovseg.models.clip  # noqa: F401  (registers ovseg/models/configs with open_clip)

    cfg = cfg or PretrainConfig()
    log = log or (lambda _msg: None)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()

    model = open_clip.create_model(cfg.model, pretrained=None)
    model.train()
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    preprocess = open_clip.get_model_preprocess_cfg(model)
    mean = torch.tensor(preprocess["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(preprocess["std"]).view(1, 3, 1, 1)
    tokenizer = open_clip.get_tokenizer(cfg.model)
    vocab_size = model.token_embedding.weight.shape[0]

    ids, images, classes, captions = load_split_images(root, "train", size, cfg.limit)
    n = len(ids)
    if n < cfg.batch_size:
        raise ValueError(f"{root}: {n} train images, fewer than one batch of {cfg.batch_size}")
    log(f"pretrain: {n} train images at {size}x{size}, {cfg.steps} steps of {cfg.batch_size} "
        f"({cfg.steps * cfg.batch_size / n:.1f} epochs), data loaded in {time.perf_counter() - start:.1f} s")

    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    generator = torch.Generator().manual_seed(cfg.seed)
    caption_rng = np.random.default_rng(cfg.seed)
    used_tokens = torch.zeros(vocab_size, dtype=torch.bool)
    order = torch.empty(0, dtype=torch.long)
    losses: list[float] = []
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:
            order = torch.randperm(n, generator=generator)
        index, order = order[: cfg.batch_size], order[cfg.batch_size:]
        batch = images[index].float().div_(255)
        if cfg.hflip:
            flip = torch.rand(len(index), generator=generator) < 0.5
            batch[flip] = batch[flip].flip(-1)
        batch = (batch - mean) / std
        texts = [make_caption(classes[i], caption_rng) if cfg.recaption else captions[i] for i in index.tolist()]
        tokens = tokenizer(texts)
        used_tokens[tokens.unique()] = True

        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        image_features, text_features, logit_scale = model(batch, tokens)[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            recent = losses[-cfg.log_every:]
            log(f"step {step + 1}/{cfg.steps}  loss {sum(recent) / len(recent):.4f}  "
                f"logit scale {logit_scale.item():.1f}  lr {_lr_at(step, cfg):.2e}  "
                f"{time.perf_counter() - start:.0f} s")

    model.eval()
    train_seconds = time.perf_counter() - start
    # everything here but the timing is a function of the inputs, so retraining writes byte-identical weights
    summary = {"config": asdict(cfg), "num_train": n, "final_loss": round(float(np.mean(losses[-50:])), 6),
               "torch": torch.__version__, "open_clip": open_clip.__version__}
    toyworld_json = Path(root) / "toyworld.json"
    if toyworld_json.is_file():
        world = json.loads(toyworld_json.read_text())
        summary["toyworld"] = {k: world[k] for k in ("version", "seed", "size", "num_train") if k in world}
    metadata = {"ovseg_toyworld_pretrain": json.dumps(summary, sort_keys=True)}
    summary["train_seconds"] = round(train_seconds, 1)
    if cfg.compact:
        state = compact_state_dict(model, used_tokens)
    else:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_weights(state, out, metadata if Path(out).suffix == ".safetensors" else None)
    log(f"wrote {out} ({Path(out).stat().st_size / 1e6:.1f} MB) after {train_seconds:.0f} s")
    return summary
