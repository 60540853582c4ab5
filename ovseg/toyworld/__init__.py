"""The toy world: a procedurally generated open-vocabulary segmentation benchmark that runs on a CPU.

Scenes are painted from a small vocabulary of named "stuff" regions and "thing" objects, each with its own
shape, colour and texture, so the class names carry meaning a tiny CLIP can learn in minutes. A generated
root holds the scenes in the Pascal VOC layout (read by the ``toyworld`` dataset spec), class-agnostic
instance masks in SA-1B JSON format and one caption per image. See ``ovseg/toyworld/README.md``.

    ovseg toyworld generate --root data/toyworld
    ovseg toyworld pretrain --root data/toyworld --out toyworld-vit.safetensors
    ovseg toyworld zeroshot --root data/toyworld
"""

from ovseg.toyworld.generate import CLASSES, STUFF, THINGS, generate, render_scene, sample_scene

__all__ = ["CLASSES", "STUFF", "THINGS", "generate", "render_scene", "sample_scene"]
