"""CLIP-S4 (CVPR 2023): pixel-segment contrastive learning with CLIP embedding and semantic consistency, and its
data recipe (the ``TwoViewImages`` training source)."""

from ovseg.methods.clips4.backbones import Backbone, CLIPDenseEncoder, UpsampleHead
from ovseg.methods.clips4.losses import (embedding_consistency, pixel_segment_infonce, pixel_segment_multi_positive,
                                         semantic_consistency)
from ovseg.methods.clips4.method import CLIPS4, vocabulary_split_scores
from ovseg.methods.clips4.prototypes import UnknownPrototypes, unexplained
from ovseg.models.segments import (segment_mean, segment_pixels, segment_sizes, segsort_kmeans,
                                           spherical_kmeans)
from ovseg.methods.clips4.views import TwoViewImages, TwoViews

__all__ = [
    "CLIPS4", "Backbone", "CLIPDenseEncoder", "UpsampleHead", "UnknownPrototypes", "unexplained",
    "pixel_segment_infonce", "pixel_segment_multi_positive", "embedding_consistency", "semantic_consistency",
    "spherical_kmeans", "segsort_kmeans", "segment_pixels", "segment_mean", "segment_sizes",
    "vocabulary_split_scores", "TwoViews", "TwoViewImages",
]
