"""Unknown prototypes (CLIP-S4 step 7, reconstruction): target classes without names, and the rule that decides
which segments train towards them.

A bank of ``M`` unit vectors in CLIP space. Until initialised, it collects the CLIP segment embeddings that no known
prototype explains (CLIP's best softmax probability over the known prototypes, at τ_s, below ``threshold``); once it
holds ``init_min_segments`` of them, spherical k-means over them gives the ``M`` prototypes. Afterwards every step
moves each prototype towards the mean of the segments the bank is fed (nearest prototype):
``p <- normalize(m p + (1 - m) mean)``. Buffers only: the prototypes never receive gradients. Updates use the
segments of all processes (gathered), so every process holds the same bank.

Which segments meet the unknown prototypes, and which feed the bank, is ``unknown_targets`` (:data:`UNKNOWN_TARGETS`):

- ``calibrated`` (default): one assignment over known text prototypes ∪ unknown image prototypes, the unknown
  side's cosines lowered by the image–text *gap measured on the known classes*: each known class keeps the EMA mean
  of the CLIP segments CLIP puts on it (its image-side centroid ``m_c``), and the gap is the EMA of the mean, over
  segments, of ``cos(s, m_c) − cos(s, t_c)`` for the segment's best known class ``c``. Image prototypes sit closer to
  any image segment than text does (CLIP's modality gap), so without it they take over every segment; with it a
  segment goes unknown when an unknown prototype fits it better, relative to text, than its known class's own
  centroid typically does — a held-out class's prototype fits its segments as a class centroid would, a known
  segment stays with its text. The bank is fed the segments this assignment puts on an unknown prototype.
- ``shifted``: the unknown prototypes are moved into the text side by the mean image → text offset of confidently
  matched segments (an EMA of ``t_c(s) − s`` over segments whose best known probability is ≥ ``threshold``;
  the "mind the gap" shift), then one assignment over known ∪ shifted unknown; fed as ``calibrated``.
- ``gated``: segments the known classes explain (best known probability ≥ ``threshold``) never see the unknown
  prototypes; the bank is fed the unexplained ones. At τ_s = 0.01 that softmax is saturated: nearly every segment is
  "explained", so the bank does almost nothing (measured: ``ovseg toyworld clips4-study``).
- ``shared``: one plain softmax over known ∪ unknown for every segment, the bank fed the unexplained segments (image
  prototypes then take over known segments).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovseg.models.segments import spherical_kmeans

__all__ = ["UNKNOWN_TARGETS", "UnknownPrototypes", "unexplained"]

UNKNOWN_TARGETS = ("calibrated", "shifted", "gated", "shared")


def unexplained(clip_segments: Tensor, known: Tensor, temperature: float, threshold: float) -> Tensor:
    """``[S]`` bool: segments whose best softmax probability over the known prototypes is below ``threshold``."""
    if known.shape[0] == 0:
        return torch.ones(clip_segments.shape[0], dtype=torch.bool, device=clip_segments.device)
    probs = F.softmax(clip_segments @ known.t() / temperature, dim=-1)
    return probs.max(dim=-1).values < threshold


class UnknownPrototypes(nn.Module):
    """The bank of unknown prototypes and its assignment rule.
    """

    prototypes: Tensor
    initialized: Tensor
    gap: Tensor
    offset: Tensor
    known_means: Tensor
    calibrated: Tensor

    def __init__(self, num: int, dim: int, momentum: float = 0.99, threshold: float = 0.5,
                 temperature: float = 0.01, init_min_segments: int | None = None, kmeans_iterations: int = 20,
                 rule: str = "calibrated", num_known: int = 0):
        """An empty bank (initialised from the first unexplained segments).

        Args:
            num: M, the number of unknown prototypes (0 disables them).
            dim: the CLIP embedding width.
            momentum: EMA momentum of the prototypes and of the calibration (``gap`` / ``offset``).
            threshold: a segment is explained when CLIP's best known probability (at ``temperature``) reaches it.
            temperature: τ_s of the softmaxes.
            init_min_segments: unexplained segments collected before the k-means initialisation (default 4 × M).
            kmeans_iterations: iterations of that k-means.
            rule: one of :data:`UNKNOWN_TARGETS`.
            num_known: K, the number of known prototypes (``calibrated`` keeps an image-side centroid for each).
        """
        super().__init__()
        if rule not in UNKNOWN_TARGETS:
            raise ValueError(f"unknown_targets must be one of {UNKNOWN_TARGETS}, got {rule!r}")
        self.num, self.momentum, self.threshold, self.temperature = num, momentum, threshold, temperature
        self.init_min_segments = max(num, init_min_segments if init_min_segments is not None else 4 * num)
        self.kmeans_iterations, self.rule = kmeans_iterations, rule
        self.register_buffer("prototypes", torch.zeros(num, dim))
        self.register_buffer("initialized", torch.tensor(False))
        # calibration across the image–text gap (EMA; 'calibrated': a cosine, 'shifted': a vector), once measured
        self.register_buffer("gap", torch.tensor(0.0))
        self.register_buffer("offset", torch.zeros(dim))
        self.register_buffer("calibrated", torch.tensor(False))
        self.register_buffer("known_means", torch.zeros(num_known, dim))  # 0 = no segment seen yet
        self._pending: list[Tensor] = []
        self._register_load_state_dict_pre_hook(_add_calibration_keys, with_module=True)

    @property
    def active(self) -> Tensor:
        """The prototypes in use: ``[M, D]`` once initialised, else ``[0, D]``."""
        return self.prototypes if bool(self.initialized) and self.num > 0 else self.prototypes[:0]

    def _calibration(self, clip_segments: Tensor, known: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """This batch's gap (``calibrated``, after moving the known classes' image centroids) or image → text offset
        (``shifted``), to blend into the EMA."""
        if self.rule == "calibrated" and len(known) and len(clip_segments) and len(self.known_means) == len(known):
            best = (clip_segments @ known.t()).argmax(-1)
            sums = torch.zeros_like(self.known_means).index_add_(0, best, clip_segments)
            seen = self.known_means.norm(dim=-1, keepdim=True) > 0
            hit = sums.norm(dim=-1, keepdim=True) > 0
            blended = torch.where(seen, self.momentum * self.known_means + (1 - self.momentum) * F.normalize(
                sums, dim=-1), F.normalize(sums, dim=-1))
            self.known_means.copy_(torch.where(hit, F.normalize(blended, dim=-1), self.known_means))
            centroid = self.known_means[best]
            gap = ((clip_segments * centroid).sum(-1) - (clip_segments * known[best]).sum(-1)).mean()
            return gap, None
        if self.rule == "shifted" and len(known) and len(clip_segments):
            confident = ~unexplained(clip_segments, known, self.temperature, self.threshold)
            if confident.any():
                best = (clip_segments[confident] @ known.t()).argmax(-1)
                return None, (known[best] - clip_segments[confident]).mean(0)
        return None, None

    def targets(self, known: Tensor) -> Tensor:
        """The unknown prototypes as the semantic targets see them (``shifted``: moved to the text side)."""
        unknown = self.active.to(known.dtype)
        if self.rule == "shifted" and len(unknown) and bool(self.calibrated):
            return F.normalize(unknown + self.offset.to(known.dtype), dim=-1)
        return unknown

    def target_bias(self, num_known: int) -> Tensor:
        """``[K + M]`` offsets added to the cosines to the targets (``calibrated``: −gap on the unknown side)."""
        bias = torch.zeros(num_known + len(self.active), device=self.prototypes.device)
        if self.rule == "calibrated" and len(self.active) and bool(self.calibrated):
            bias[num_known:] = -self.gap
        return bias

    def logits(self, clip_segments: Tensor, known: Tensor) -> Tensor:
        """``[S, K + M]`` cosines of CLIP segments to the known and (as the rule sees them) unknown prototypes plus
        :meth:`target_bias`: the assignment every rule starts from."""
        targets = torch.cat([known, self.targets(known)])
        return clip_segments @ targets.t() + self.target_bias(len(known)).to(clip_segments.dtype)

    def allowed(self, clip_segments: Tensor, known: Tensor) -> Tensor | None:
        """``[S, K + M]`` targets each segment may use (``gated``: explained segments lose the unknown ones), or
        None (all)."""
        if self.rule != "gated" or not len(self.active):
            return None
        explained = ~unexplained(clip_segments, known, self.temperature, self.threshold)
        allowed = torch.ones(len(clip_segments), len(known) + len(self.active), dtype=torch.bool,
                             device=clip_segments.device)
        allowed[:, len(known):] = ~explained[:, None]
        return allowed

    def feeds(self, clip_segments: Tensor, known: Tensor) -> Tensor:
        """``[S]`` bool: the segments that feed the bank (initialisation always takes the unexplained ones)."""
        if self.rule in ("calibrated", "shifted") and bool(self.initialized) and self.num > 0:
            return self.logits(clip_segments, known).argmax(-1) >= len(known)
        return unexplained(clip_segments, known, self.temperature, self.threshold)

    @torch.no_grad()
    def update(self, clip_segments: Tensor, known: Tensor, generator: torch.Generator | None = None) -> int:
        """Initialise from / EMA-update with the segments the rule feeds among ``clip_segments`` ``[S, D]`` (unit norm,
        detached, identical on every process) and update the calibration. Returns how many fed the bank."""
        if self.num == 0:
            return 0
        segments = F.normalize(clip_segments.detach().float(), dim=-1)
        known = F.normalize(known.float(), dim=-1)
        mask = self.feeds(segments, known)
        fed = segments[mask]
        if fed.shape[0]:
            self._absorb(fed, generator)
        self.calibrate(segments, known)
        return int(fed.shape[0])

    def _absorb(self, fed: Tensor, generator: torch.Generator | None) -> None:
        if not bool(self.initialized):
            self._pending.append(fed)
            pool = torch.cat(self._pending)
            if pool.shape[0] >= self.init_min_segments:
                _, centres = spherical_kmeans(pool[None], self.num, self.kmeans_iterations, generator)
                self.prototypes.copy_(centres[0])
                self.initialized.fill_(True)
                self._pending.clear()
            return
        assign = (fed @ self.prototypes.t()).argmax(dim=-1)
        sums = torch.zeros_like(self.prototypes).index_add_(0, assign, fed)
        counts = torch.bincount(assign, minlength=self.num).to(sums.dtype)[:, None]
        hit = counts[:, 0] > 0
        mean = sums / counts.clamp_min(1)
        updated = F.normalize(self.momentum * self.prototypes + (1 - self.momentum) * mean, dim=-1)
        self.prototypes.copy_(torch.where(hit[:, None], updated, self.prototypes))

    def calibrate(self, segments: Tensor, known: Tensor) -> None:
        """Blend this batch's gap / offset (unit-norm segments and known prototypes) into the EMA; the first
        measurement is taken as it is."""
        gap, offset = self._calibration(segments, known)
        for buffer, value in ((self.gap, gap), (self.offset, offset)):
            if value is not None:
                blended = self.momentum * buffer + (1 - self.momentum) * value if bool(self.calibrated) else value
                buffer.copy_(blended)
                self.calibrated.fill_(True)


def _add_calibration_keys(module: UnknownPrototypes, state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints written before the calibration buffers existed load with them unmeasured."""
    for name in ("gap", "offset", "known_means", "calibrated"):
        state_dict.setdefault(prefix + name, torch.zeros_like(getattr(module, name)))
