"""ResCLIP (Yang et al., "ResCLIP: Residual Attention for Training-free Dense Vision-language Inference", CVPR 2025,
arXiv 2411.15851), as its released code computes it (github.com/yvhangyang/ResCLIP, ``clip/model.py``
``VisionTransformer.forward`` / ``custom_attn`` / ``generate_attention_sfr``, ``resclip_segmentor.py``):

1. **RCS**, residual cross-correlation self-attention: the query-key attention maps softmax(q kᵀ s) of blocks 6-9
   (0-based 5-8, :data:`RCS_LAYERS`), averaged (:func:`residual_attention`), are mixed into the last block's attention
   probabilities: ``P <- τ_r ((1 - λ_r) P + λ_r A_rcs)``.
2. **SFR**, semantic feedback refinement: a first pass of the last block (with RCS) gives a segmentation of the
   window (cosine with the class-name embeddings, bilinear to the window, PAMR 10 steps / dilations 8, 16, softmax
   at logit scale 40); each patch takes its most frequent query, below ``temp_thd`` query 0 (:func:`patch_labels`).
   Patches of one label attend to each other, decayed with distance when the straight path between them leaves
   the label, blurred along each row and row-normalised (:func:`feedback_attention`); the matrix is mixed into the
   baseline's attention **logits** before the softmax: ``S <- τ_s ((1 - λ_s) S + λ_s A_sfr)``.

Both sit on a baseline's last block, named by ``clip.last_block``/``residual``/``ffn`` as for the baselines
themselves (the reference's ``arch``/``attn_strategy``): ``naclip`` (the released main results, their ``wo_resi
resclip``: k kᵀ s plus NACLIP's Gaussian neighbourhood bias, added after the SFR mix), ``qq_kk`` (SCLIP, ``w_resi
sclip``: each of q qᵀ s and k kᵀ s mixed, softmaxes summed), ``qq`` (ClearCLIP) and ``vanilla`` (q kᵀ s).
:data:`BASELINES` lists them.

The released configs tune ``temp_thd`` and the (τ, λ) pairs per dataset (``configs/cfg_*.py``):
:data:`DATASET_SETTINGS`, read for the dataset being scored (the evaluator names it, :meth:`ResCLIP.scoring`).

Where the released code differs from its own intent, ovseg follows the code that made the numbers, or says so:
the segmentor stores ``use_rcs``/``use_sfr`` as one-element tuples (``self.use_rcs=use_rcs,``), so the released runs
always use both (``rcs``/``sfr`` here are ``VisionTransformer.forward``'s switches, for the paper's ablations);
the first pass's PAMR sits in a ``try``/``except RuntimeError`` that goes on without it (e.g. out of GPU memory),
ovseg always runs it; the reference takes one window at a time (its first-pass softmax loop is right for one image
only), ovseg computes SFR per image of a batch.

Evaluation pipeline: ResCLIP's ``configs/cfg_*.py`` and ``resclip_segmentor.py`` are NACLIP's (short side 336
everywhere, 224/112 windows, whole-image VOC, logit scale 40, probability threshold 0.1 on VOC21 / Context60 /
COCO-Object, SCLIP's class-name files, byte-identical in the checkout, and ``pamr_steps=0``): the ``naclip``
protocol, checked by ``ovseg parity --ref ResCLIP=DIR``. This module registers nothing global; it is the whole method.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ovseg.eval.pamr import PAMR
from ovseg.methods.base import PerDatasetSettings, cosine_logits
from ovseg.methods.naclip import GAUSSIAN_STD, _cached_bias
from ovseg.methods.zeroshot import ZeroShotCLIP
from ovseg.models.attention import AttentionTokens
from ovseg.models.clip import CLIPConfig, TransformerBlockView, dense_last_block

#: blocks (0-based) whose query-key attention RCS averages (clip/model.py forward: ``attn_map[i] for i in range(5,
#: 9)``, the same for ViT-B/16 and ViT-L/14)
RCS_LAYERS = (5, 6, 7, 8)
#: SFR's first-pass segmentation (clip/model.py create_logit_temp): ``PAMR(10, dilations=(8, 16))`` on the window,
#: then ``softmax(logits * logit_scale)`` with the segmentor's ``logit_scale=40`` (no released config changes it)
SFR_PAMR_STEPS = 10
SFR_PAMR_DILATIONS = (8, 16)
SFR_LOGIT_SCALE = 40.0
#: clip/model.py custom_attn casts the SFR matrix to fp16 (``attn_sfr.to(torch.float16)``), so ``λ_s A_sfr`` is
#: computed and rounded in fp16 before it meets the fp32 logits; the released numbers were made so, it is kept
SFR_DTYPE = torch.float16
#: pairs of patches whose straight-path check runs at once (a whole 2048x1024 VOC image has 882 patches: 778k pairs
#: x 42 steps of coordinates)
PATH_BLOCK_PAIRS = 2**16


@dataclass(frozen=True)
class ResCLIPSettings:
    """ResCLIP's per-dataset hyper-parameters (the released ``configs/cfg_*.py`` model keys).

    Args:
        temp_thd: SFR: a pixel of the first-pass segmentation whose top probability is below it takes query 0.
        rcs_weights: (τ_r, λ_r) of the RCS mix ``τ_r ((1 - λ_r) P + λ_r A_rcs)``.
        sfr_weights: (τ_s, λ_s) of the SFR mix ``τ_s ((1 - λ_s) S + λ_s A_sfr)``.
        delete_same_entity: decay same-label pairs whose straight path leaves the label (``exp(-steps / max)``).
    """

    temp_thd: float
    rcs_weights: tuple[float, float]
    sfr_weights: tuple[float, float]
    delete_same_entity: bool = True

    def __post_init__(self):
        for name in ("rcs_weights", "sfr_weights"):
            value = getattr(self, name)
            if len(value) != 2:
                raise ValueError(f"ResCLIP {name} must be (tau, lambda), got {value!r}")
            object.__setattr__(self, name, (float(value[0]), float(value[1])))


#: the released configs/cfg_<dataset>.py (ovseg dataset names); every one sets delete_same_entity=True
DATASET_SETTINGS: dict[str, ResCLIPSettings] = {
    "voc21": ResCLIPSettings(0.50, (2.0, 0.3), (2.2, 0.7)),
    "voc20": ResCLIPSettings(0.10, (2.0, 0.6), (2.1, 0.6)),
    "context60": ResCLIPSettings(0.30, (2.0, 0.3), (1.8, 0.7)),
    "context59": ResCLIPSettings(0.25, (2.0, 0.4), (1.8, 0.7)),
    "coco_object": ResCLIPSettings(0.11, (2.0, 0.4), (1.8, 0.7)),
    "coco_stuff171": ResCLIPSettings(0.11, (2.0, 0.4), (1.8, 0.7)),
    "cityscapes": ResCLIPSettings(0.10, (2.0, 0.2), (2.1, 0.6)),
    "ade150": ResCLIPSettings(0.25, (2.0, 0.3), (2.1, 0.7)),
}
#: any other dataset (the toy world, ``ovseg predict``): the released demo.py's values
DEMO_SETTINGS = ResCLIPSettings(0.10, (2.0, 0.6), (2.1, 0.6))


# -- RCS ------------------------------------------------------------------------------------------------------
def cross_correlation_attention(tokens: AttentionTokens) -> Tensor:
    """CLIP's own attention probabilities softmax(q kᵀ s), ``[B, heads, 1+N, 1+N]``."""
    return torch.softmax(tokens.q @ tokens.k.transpose(-1, -2) * tokens.scale, dim=-1)


def residual_attention(block_inputs: list[Tensor], blocks: list[TransformerBlockView], grid: tuple[int, int],
                       attention_map: Callable[[AttentionTokens], Tensor] = cross_correlation_attention) -> Tensor:
    """RCS: the mean of ``attention_map`` (:func:`cross_correlation_attention`; ITACLIP's self-self maps) over
    ``blocks`` read at their inputs ``[B, 1+N, C]``."""
    maps = [attention_map(AttentionTokens(block.ln_1(x), block, grid)) for x, block in zip(block_inputs, blocks)]
    return torch.stack(maps).mean(dim=0)


# -- SFR ------------------------------------------------------------------------------------------------------
def patch_labels(probs: Tensor, patch_size: int, threshold: float) -> Tensor:
    """Per-pixel query probabilities ``[B, Q, H, W]`` -> each patch's label ``[B, H // p, W // p]``: the argmax
    query, query 0 where the top probability is below ``threshold``, then the most frequent label of the patch's
    p×p pixels (``torch.mode``: the smallest of tied labels); remainder rows/columns are dropped (clip/model.py
    create_patch_matrix)."""
    top, labels = probs.max(dim=1)
    labels = labels.masked_fill(top < threshold, 0)
    p = patch_size
    patches = labels.unfold(1, p, p).unfold(2, p, p)  # [B, h, w, p, p]
    return torch.mode(patches.flatten(-2), dim=-1).values


def intact_paths(labels: Tensor) -> tuple[Tensor, Tensor]:
    """For a patch-label grid ``[h, w]``: whether the straight path from each patch i to each patch j keeps i's
    label, ``[N, N]`` bool, and the pairs' Chebyshev distances ``[N, N]``, as clip/model.py ``check_path`` samples it:
    ``max_steps + 1`` points ``i (1 - t) + j t`` with ``t = linspace(0, 1, max_steps + 1)`` (``max_steps``: the largest
    distance of the grid), rounded half to even, of which only the first ``steps(i, j) + 1`` are checked (a pair
    closer than ``max_steps`` is checked over the part of its segment nearest to i, not the whole of it)."""
    rows, cols = labels.shape
    index = torch.arange(rows * cols, device=labels.device)
    coords = torch.stack([index // cols, index % cols], dim=-1)  # row-major patch positions
    steps = (coords[:, None] - coords[None]).abs().amax(dim=-1)  # [N, N]
    max_steps = int(steps.max())
    t = torch.linspace(0, 1, max_steps + 1, device=labels.device)[None, :, None]
    flat = labels.flatten()
    intact = torch.empty(rows * cols, rows * cols, dtype=torch.bool, device=labels.device)
    starts, ends = coords.repeat_interleave(rows * cols, 0), coords.repeat(rows * cols, 1)
    pair_steps = steps.flatten()
    for lo in range(0, starts.shape[0], PATH_BLOCK_PAIRS):
        s, e = starts[lo:lo + PATH_BLOCK_PAIRS], ends[lo:lo + PATH_BLOCK_PAIRS]
        points = (s[:, None] * (1 - t) + e[:, None] * t).round().long()  # float32, as the reference
        same = labels[points[..., 0], points[..., 1]] == flat[s[:, 0] * cols + s[:, 1]][:, None]
        checked = torch.arange(max_steps + 1, device=labels.device)[None] <= pair_steps[lo:lo + PATH_BLOCK_PAIRS, None]
        intact.view(-1)[lo:lo + PATH_BLOCK_PAIRS] = (same | ~checked).all(dim=1)
    return intact, steps


def feedback_attention(labels: Tensor, std: float = GAUSSIAN_STD, delete_same_entity: bool = True) -> Tensor:
    """SFR's attention ``[1+N, 1+N]`` from a patch-label grid ``[h, w]`` (clip/model.py generate_attention_sfr, then
    custom_attn's ``/ max``): 1 between patches of one label; with ``delete_same_entity`` a
    pair whose path is not intact (:func:`intact_paths`) is multiplied by ``exp(-steps / max_steps)``; each row is
    convolved (zero padding) with a normalised 1-D Gaussian of ``std`` over the row-major patch index (kernel
    ``min(N, int(6 std + 1))``, made odd), clipped at 0 and divided by its sum + 1e-8; the class token's row and
    column are 0. The matrix is divided by its maximum."""
    rows, cols = labels.shape
    n = rows * cols
    flat = labels.flatten()
    same = (flat[:, None] == flat[None]).float()
    if delete_same_entity:
        intact, steps = intact_paths(labels)
        decay = torch.exp(-steps / steps.max())
        same = torch.where(intact, same, same * decay)
    size = min(n, int(6 * std + 1))
    size = size if size % 2 == 1 else size + 1
    offsets = torch.arange(size, device=labels.device) - size // 2
    kernel = torch.exp(-(offsets**2) / (2 * std**2))
    kernel = kernel / kernel.sum()
    blurred = F.relu(F.conv1d(same[:, None], kernel.view(1, 1, -1), padding=size // 2)[:, 0])
    blurred = blurred / (blurred.sum(dim=1, keepdim=True) + 1e-8)
    sfr = F.pad(blurred, (1, 0, 1, 0))
    return sfr / sfr.max()


# -- the last block -------------------------------------------------------------------------------------------
#: ovseg baseline (``clip.last_block``) -> the attention logits ResCLIP mixes SFR into (each softmaxed, summed);
#: the reference's ``attn_strategy`` ``resclip``/``naclip``, ``sclip``, ``clearclip``, ``vanilla`` (custom_attn)
BASELINES: dict[str, tuple[str, ...]] = {"naclip": ("kk",), "qq_kk": ("qq", "kk"), "qq": ("qq",),
                                         "vanilla": ("qk",)}


def resclip_attention(tokens: AttentionTokens, baseline: str, rcs: Tensor | None = None,
                      rcs_weights: tuple[float, float] = (1.0, 0.0), sfr: Tensor | None = None,
                      sfr_weights: tuple[float, float] = (1.0, 0.0), std: float = GAUSSIAN_STD) -> Tensor:
    """The last block's attended values ``[B, heads, 1+N, head_dim]``: the baseline's logits (:data:`BASELINES`),
    each mixed with ``sfr`` ``[B, 1+N, 1+N]`` (or ``[1+N, 1+N]``, in :data:`SFR_DTYPE` as the reference), NACLIP's
    neighbourhood bias added after the mix (``naclip``), softmaxed and summed, mixed with ``rcs`` ``[B, heads, 1+N,
    1+N]``, applied to the values."""
    if baseline not in BASELINES:
        raise ValueError(f"ResCLIP runs on the baselines {sorted(BASELINES)} (clip.last_block), got {baseline!r}")
    pairs = {"kk": (tokens.k, tokens.k), "qq": (tokens.q, tokens.q), "qk": (tokens.q, tokens.k)}
    if sfr is not None:
        sfr = sfr.to(SFR_DTYPE)
        sfr = sfr[:, None] if sfr.dim() == 3 else sfr
    probs = 0
    for name in BASELINES[baseline]:
        a, b = pairs[name]
        logits = a @ b.transpose(-1, -2) * tokens.scale
        if sfr is not None:
            tau, lam = sfr_weights
            logits = tau * ((1 - lam) * logits + lam * sfr)
        if baseline == "naclip":
            logits = logits + _cached_bias(tuple(tokens.grid), float(std), logits.device, logits.dtype)
        probs = probs + torch.softmax(logits, dim=-1)
    if rcs is not None:
        tau, lam = rcs_weights
        probs = tau * ((1 - lam) * probs + lam * rcs)
    return probs @ tokens.v


class ResCLIP(PerDatasetSettings, ZeroShotCLIP):
    """ResCLIP: RCS and SFR on a baseline's last block (default NACLIP's, the released main results); the
    ``naclip`` protocol (its pipeline is NACLIP's)."""

    default_protocol = "naclip"

    def __init__(
        self,
        clip: CLIPConfig = CLIPConfig(last_block="naclip", residual="none", ffn=False),
        dataset_settings: dict[str, dict[str, Any]] | None = None,
        default_settings: dict[str, Any] | None = None,
        rcs: bool = True,
        sfr: bool = True,
        rcs_layers: tuple[int, ...] = RCS_LAYERS,
        gaussian_std: float = GAUSSIAN_STD,
        sfr_logit_scale: float = SFR_LOGIT_SCALE,
        **evaluation: Any,
    ):
        """A dense CLIP whose last block is ResCLIP's on the baseline ``clip`` names.

        Args:
            clip: the CLIP and the baseline's last block: ``last_block`` one of ``naclip`` (residual ``none``, no
                MLP: the released ``wo_resi resclip``), ``qq_kk`` (SCLIP: residual ``token``, MLP), ``qq``
                (ClearCLIP: ``none``, no MLP) or ``vanilla``.
            dataset_settings: per dataset, changes to the released :data:`DATASET_SETTINGS` (``temp_thd``,
                ``rcs_weights``, ``sfr_weights``, ``delete_same_entity``; a dataset not there starts from the
                defaults).
            default_settings: changes to the settings of any dataset without its own (the released demo.py's
                ``temp_thd`` 0.10, ``rcs_weights`` (2.0, 0.6), ``sfr_weights`` (2.1, 0.6)).
            rcs: mix the residual cross-correlation attention in (off: the paper's ablation without RCS).
            sfr: mix the semantic feedback in (off: without SFR; no first pass).
            rcs_layers: the blocks (0-based) whose attention RCS averages (released: 5-8, for ViT-B/16 and L/14).
            gaussian_std: std (in patches) of NACLIP's neighbourhood bias and of SFR's row blur (the released
                ``test_all.sh ... 5``).
            sfr_logit_scale: softmax temperature of SFR's first-pass segmentation (the segmentor's logit scale 40).
            **evaluation: the evaluation settings of :class:`~ovseg.methods.base.OVSegMethod` (``protocol``, …).
        """
        if clip.last_block not in BASELINES:
            raise ValueError(f"ResCLIP runs on the baselines {sorted(BASELINES)} (clip.last_block), got "
                             f"{clip.last_block!r}")
        super().__init__(clip, **evaluation)
        if self.encoder.kind != "vit":
            raise NotImplementedError(f"ResCLIP needs an open_clip ViT, {clip.name!r} is {self.encoder.kind!r}")
        layers = len(self.encoder.model.visual.transformer.resblocks)
        if rcs and not (rcs_layers and all(1 <= i <= layers - 2 for i in rcs_layers)):
            raise ValueError(f"rcs_layers {list(rcs_layers)} must be blocks between the first and the last of "
                             f"{clip.name!r} (1 … {layers - 2})")
        self.settings = {name: dataclasses.replace(s, **(dataset_settings or {}).get(name, {}))
                         for name, s in DATASET_SETTINGS.items()}
        for name, changes in (dataset_settings or {}).items():
            if name not in self.settings:
                self.settings[name] = dataclasses.replace(DEMO_SETTINGS, **changes)
        self.default = dataclasses.replace(DEMO_SETTINGS, **(default_settings or {}))
        self.rcs, self.sfr = bool(rcs), bool(sfr)
        self.rcs_layers = tuple(int(i) for i in rcs_layers)
        self.gaussian_std, self.sfr_logit_scale = float(gaussian_std), float(sfr_logit_scale)
        self.current = self.default
        self._feedback_inputs: tuple[Tensor, Tensor] | None = None
        self.encoder.last_stage = self._last_stage

    #: SFR feeds the first pass's labels, made with the words, back into the last block: the image side depends on
    #: the vocabulary, so ``ovseg demo`` must not reuse it across vocabularies
    reuses_features = False

    @torch.no_grad()
    def dense_logits(self, images: Tensor, text: Tensor) -> Tensor:
        normalized = self.encoder.normalize(images)
        self._feedback_inputs = (normalized, text)
        try:
            features = self.encoder.encode_dense(normalized)
        finally:
            self._feedback_inputs = None
        return cosine_logits(features, text)

    # -- the encoder's last stage -------------------------------------------------------------------------
    def _block(self, x: Tensor, last: TransformerBlockView, grid: tuple[int, int], rcs: Tensor | None,
               sfr: Tensor | None) -> Tensor:
        cfg, s = self.encoder.config, self.current

        def attention(tokens: AttentionTokens) -> Tensor:
            return resclip_attention(tokens, cfg.last_block, rcs, s.rcs_weights, sfr, s.sfr_weights,
                                     self.gaussian_std)

        return dense_last_block(x, last, attention, cfg.residual, cfg.ffn, grid)

    def _last_stage(self, hidden: list[Tensor], last: TransformerBlockView, grid: tuple[int, int]) -> Tensor:
        """``hidden``: the outputs of blocks 0 … L-2; returns the last block's output (before ``ln_post``)."""
        resblocks = self.encoder.model.visual.transformer.resblocks
        rcs = None
        if self.rcs:
            # block i reads block i-1's output (block 0 would read the embeddings, which RCS never uses)
            rcs = residual_attention([hidden[i - 1] for i in self.rcs_layers],
                                     [TransformerBlockView.from_open_clip(resblocks[i]) for i in self.rcs_layers], grid)
        x = hidden[-1]
        sfr = None
        if self.sfr:
            if self._feedback_inputs is None:
                raise RuntimeError("ResCLIP's semantic feedback needs the class-name embeddings: call dense_logits")
            images, text = self._feedback_inputs
            first = self._block(x, last, grid, rcs, None)
            probs = self._first_pass_probabilities(first, images, text, grid)
            s = self.current
            labels = patch_labels(probs, self.encoder.patch_size, s.temp_thd)
            if tuple(labels.shape[-2:]) != tuple(grid):
                raise ValueError(f"ResCLIP's feedback reads whole patches of the input: the protocol's patch padding "
                                 f"({self.encoder.options.patch_padding!r}) gives a {grid} grid for "
                                 f"{tuple(images.shape[-2:])} inputs; use patch_padding: none")
            sfr = torch.stack([feedback_attention(grid_labels, self.gaussian_std, s.delete_same_entity)
                               for grid_labels in labels])
        return self._block(x, last, grid, rcs, sfr)

    def _first_pass_probabilities(self, tokens: Tensor, images: Tensor, text: Tensor,
                                  grid: tuple[int, int]) -> Tensor:
        """SFR's segmentation of each window: ``[B, Q, H, W]`` query probabilities (clip/model.py
        create_logit_temp)."""
        visual = self.encoder.model.visual
        patches = (visual.ln_post(tokens) @ visual.proj)[:, 1:]
        features = patches.transpose(1, 2).reshape(patches.shape[0], -1, *grid)
        logits = cosine_logits(features, text)
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        refined = torch.cat([PAMR(image[None], SFR_PAMR_STEPS, SFR_PAMR_DILATIONS)(scores[None])
                             for image, scores in zip(images, logits)])
        return torch.softmax(refined.to(logits.dtype) * self.sfr_logit_scale, dim=1)

