"""Methods: :class:`OVSegMethod` and one module per method. Importing this package registers them
with the CLI, so configs can say ``class_path: MaskCLIP``."""

from ovseg.methods.base import OVSegMethod
from ovseg.methods.clips4 import CLIPS4
from ovseg.methods.pixelclip import PixelCLIP
from ovseg.methods.zeroshot import CLIP, MaskCLIP, ZeroShotCLIP

__all__ = ["OVSegMethod", "ZeroShotCLIP", "CLIP", "MaskCLIP", "PixelCLIP", "CLIPS4"]
