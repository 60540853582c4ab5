"""The pixel-embedding backbone interface (CLIP-S4's model f): images in [0, 1] ``[B, 3, H, W]``
-> embeddings ``[B, D, H/s, W/s]`` in CLIP's joint space. It lives in ``models/`` so backbones of any method
(``ovseg.methods.clips4.CLIPDenseEncoder``, ``ovseg.models.deeplab.DeepLabResNet``) depend downwards only.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ovseg.models.clip import DenseCLIP

__all__ = ["Backbone"]


class Backbone(nn.Module):
    """Base class (config: ``backbone: {class_path: ovseg.methods.clips4.CLIPDenseEncoder, init_args: ...}``)."""

    output_stride: int = 8

    def build(self, teacher: DenseCLIP) -> None:
        raise NotImplementedError

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        raise NotImplementedError

    @property
    def settings(self) -> dict[str, Any]:
        """Constructor settings as a config entry (recorded in the method's hyper-parameters, which
        LightningCLI re-parses from checkpoints, and in results files)."""
        return {"class_path": f"{type(self).__module__}.{type(self).__name__}",
                "init_args": dict(getattr(self, "_settings", {}))}
