"""MaskCLIP+ (ECCV 2022): a DeepLab-v2 student trained on a frozen MaskCLIP's online pseudo labels, and its data
recipe (the ``PseudoLabelCrops`` training source)."""

from ovseg.methods.maskclip_plus.data import MMSegCrop, PseudoLabelCrops, photometric_distortion
from ovseg.methods.maskclip_plus.method import MaskCLIPPlus, default_student, pseudo_label_cross_entropy

__all__ = ["MaskCLIPPlus", "PseudoLabelCrops", "MMSegCrop", "default_student", "photometric_distortion",
           "pseudo_label_cross_entropy"]
