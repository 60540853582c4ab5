"""PixelCLIP: method, learnable prompts, distributed Sinkhorn, ConvHead decoder, DINO k-means masks, and its data
recipe (the ``SA1B`` training source)."""

from ovseg.methods.pixelclip.data import SA1B, PixelCLIPViews
from ovseg.methods.pixelclip.dino import DinoConfig, DinoMasker, kmeans
from ovseg.methods.pixelclip.head import ConvHead
from ovseg.methods.pixelclip.method import PixelCLIP, cluster_targets, trainable_visual_names
from ovseg.methods.pixelclip.prompts import LearnablePrompts, encode_prompted_text
from ovseg.methods.pixelclip.sinkhorn import distributed_sinkhorn

__all__ = ["PixelCLIP", "SA1B", "PixelCLIPViews", "DinoConfig", "DinoMasker", "kmeans", "ConvHead", "LearnablePrompts",
           "encode_prompted_text", "distributed_sinkhorn", "cluster_targets", "trainable_visual_names"]
