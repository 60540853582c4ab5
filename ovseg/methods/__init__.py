"""Methods: :class:`OVSegMethod` and one module per method. Importing this package registers them
with the CLI, so configs can say ``class_path: MaskCLIP``."""

from ovseg.methods.base import OVSegMethod
from ovseg.methods.clearclip import ClearCLIP
from ovseg.methods.cliptrase import CLIPtrase
from ovseg.methods.clips4 import CLIPS4
from ovseg.methods.itaclip import ITACLIP
from ovseg.methods.lposs import LPOSS
from ovseg.methods.maskclip_plus import MaskCLIPPlus
from ovseg.methods.naclip import NACLIP
from ovseg.methods.pixelclip import PixelCLIP
from ovseg.methods.probes import KNNProbe, LinearProbe
from ovseg.methods.proxyclip import ProxyCLIP
from ovseg.methods.resclip import ResCLIP
from ovseg.methods.sclip import SCLIP
from ovseg.methods.scclip import SCCLIP
from ovseg.methods.trident import Trident
from ovseg.methods.zeroshot import CLIP, MaskCLIP, ZeroShotCLIP

__all__ = ["OVSegMethod", "ZeroShotCLIP", "CLIP", "MaskCLIP", "SCLIP", "ClearCLIP", "NACLIP", "ResCLIP", "SCCLIP",
           "ProxyCLIP", "Trident", "ITACLIP", "CLIPtrase", "LPOSS", "PixelCLIP", "CLIPS4", "MaskCLIPPlus",
           "KNNProbe", "LinearProbe"]
