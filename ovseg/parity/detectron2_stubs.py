"""Small stand-ins for the detectron2 (and fvcore / fast_pytorch_kmeans) imports of the PixelCLIP checkout.

Only what the authors' model and optimizer code *uses* behaves; every other imported name is a
:class:`Unused` placeholder that raises when called. Where a detectron2 function defines behaviour
(``configurable``, ``ImageList.from_tensors``, ``sem_seg_postprocess``, the config defaults PixelCLIP reads) it
is written here from detectron2's source (file cited at each); nothing here calls ovseg's own code.

``detectron2_modules()`` returns ``{module name: module}`` for :func:`ovseg.parity.common.reference_imports`.
"""

from __future__ import annotations

import ast
import copy
import functools
import inspect
import types
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.parity.common import stub_module

__all__ = ["CfgNode", "Registry", "configurable", "get_cfg", "ImageList", "sem_seg_postprocess", "Unused",
           "ResizeShortestEdge", "ResizeTransform", "detectron2_modules"]


class Unused:
    """A name the reference imports but the compared code path never uses."""

    def __init__(self, *args: Any, **kwargs: Any):
        raise NotImplementedError(f"{type(self).__name__} is a placeholder in ovseg's detectron2 stand-ins")

    def __init_subclass__(cls, **kwargs: Any):  # subclassing is fine (train_net.Trainer(DefaultTrainer))
        super().__init_subclass__(**kwargs)


def _unused(name: str) -> type:
    return type(name, (Unused,), {})


# -- detectron2/config/config.py + yacs -----------------------------------------------------------------------
class CfgNode(dict):
    """yacs-style config node: attribute access, ``merge_from_file`` / ``merge_from_list`` (values that look like
    Python literals are ``literal_eval``-ed and lists/tuples coerced to the default's type, as yacs does)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    @staticmethod
    def _decode(value: Any) -> Any:
        if isinstance(value, dict):
            return CfgNode({k: CfgNode._decode(v) for k, v in value.items()})
        if isinstance(value, str):
            try:
                return ast.literal_eval(value)
            except (ValueError, SyntaxError):
                return value
        return value

    @staticmethod
    def _coerce(new: Any, old: Any) -> Any:
        if isinstance(old, tuple) and isinstance(new, list):
            return tuple(new)
        if isinstance(old, list) and isinstance(new, tuple):
            return list(new)
        return new

    def merge(self, other: dict) -> None:
        for key, value in other.items():
            value = self._decode(value)
            if isinstance(value, dict) and isinstance(self.get(key), CfgNode):
                self[key].merge(value)
            else:
                self[key] = self._coerce(value, self.get(key))

    def merge_from_file(self, path: str) -> None:
        import yaml

        with open(path, encoding="utf-8") as f:
            self.merge(yaml.safe_load(f) or {})

    def merge_from_list(self, items: list) -> None:
        for key, value in zip(items[0::2], items[1::2]):
            node = self
            *parents, last = key.split(".")
            for p in parents:
                node = node[p]
            node[last] = self._coerce(self._decode(value), node.get(last))

    def clone(self) -> CfgNode:
        return copy.deepcopy(self)

    def freeze(self) -> None:  # no immutability in the stand-in
        pass

    def defrost(self) -> None:
        pass


def get_cfg() -> CfgNode:
    """The part of detectron2's default config (``detectron2/config/defaults.py``) that PixelCLIP's model,
    mapper and ``train_net.build_optimizer`` read, with detectron2's default values."""
    return CfgNode._decode({
        "VERSION": 2,
        "MODEL": {"META_ARCHITECTURE": "GeneralizedRCNN", "WEIGHTS": "", "DEVICE": "cuda",
                  "PIXEL_MEAN": [103.530, 116.280, 123.675], "PIXEL_STD": [1.0, 1.0, 1.0],
                  "SEM_SEG_HEAD": {"NAME": "SemSegFPNHead", "IN_FEATURES": ["p2", "p3", "p4", "p5"],
                                   "IGNORE_VALUE": 255, "NUM_CLASSES": 54, "CONVS_DIM": 128, "COMMON_STRIDE": 4,
                                   "NORM": "GN", "LOSS_WEIGHT": 1.0}},
        "INPUT": {"MIN_SIZE_TRAIN": (800,), "MIN_SIZE_TRAIN_SAMPLING": "choice", "MAX_SIZE_TRAIN": 1333,
                  "MIN_SIZE_TEST": 800, "MAX_SIZE_TEST": 1333, "RANDOM_FLIP": "horizontal",
                  "CROP": {"ENABLED": False, "TYPE": "relative_range", "SIZE": [0.9, 0.9]}, "FORMAT": "BGR",
                  "MASK_FORMAT": "polygon"},
        "DATASETS": {"TRAIN": (), "TEST": ()},
        "DATALOADER": {"NUM_WORKERS": 4, "FILTER_EMPTY_ANNOTATIONS": True},
        "SOLVER": {"LR_SCHEDULER_NAME": "WarmupMultiStepLR", "MAX_ITER": 40000, "BASE_LR": 0.001,
                   "BASE_LR_END": 0.0, "MOMENTUM": 0.9, "NESTEROV": False, "WEIGHT_DECAY": 0.0001,
                   "WEIGHT_DECAY_NORM": 0.0, "GAMMA": 0.1, "STEPS": (30000,), "WARMUP_FACTOR": 1.0 / 1000,
                   "WARMUP_ITERS": 1000, "WARMUP_METHOD": "linear", "IMS_PER_BATCH": 16, "BIAS_LR_FACTOR": 1.0,
                   "WEIGHT_DECAY_BIAS": None,
                   "CLIP_GRADIENTS": {"ENABLED": False, "CLIP_TYPE": "value", "CLIP_VALUE": 1.0,
                                      "NORM_TYPE": 2.0},
                   "AMP": {"ENABLED": False}},
        "TEST": {"EVAL_PERIOD": 0, "AUG": {"ENABLED": False}},
        "OUTPUT_DIR": "./output", "SEED": -1, "CUDNN_BENCHMARK": False,
    })


def _called_with_cfg(*args: Any, **kwargs: Any) -> bool:
    if len(args) and isinstance(args[0], CfgNode):
        return True
    return isinstance(kwargs.pop("cfg", None), CfgNode)


def _get_args_from_config(from_config_func, *args: Any, **kwargs: Any) -> dict:
    signature = inspect.signature(from_config_func)
    if list(signature.parameters.keys())[0] != "cfg":
        raise TypeError(f"{from_config_func.__self__}.from_config must take 'cfg' as the first argument!")
    support_var_arg = any(p.kind in [p.VAR_POSITIONAL, p.VAR_KEYWORD] for p in signature.parameters.values())
    if support_var_arg:
        return from_config_func(*args, **kwargs)
    supported = set(signature.parameters.keys())
    extra = {name: kwargs.pop(name) for name in list(kwargs.keys()) if name not in supported}
    ret = from_config_func(*args, **kwargs)
    ret.update(extra)
    return ret


def configurable(init_func=None, *, from_config=None):
    """detectron2/config/config.py ``configurable``: called with a CfgNode, the arguments come from
    ``from_config(cfg, ...)`` (class ``__init__`` or a function with ``from_config=``)."""
    if init_func is not None:
        @functools.wraps(init_func)
        def wrapped(self, *args, **kwargs):
            from_config_func = type(self).from_config
            if _called_with_cfg(*args, **kwargs):
                init_func(self, **_get_args_from_config(from_config_func, *args, **kwargs))
            else:
                init_func(self, *args, **kwargs)
        return wrapped

    def wrapper(orig_func):
        @functools.wraps(orig_func)
        def wrapped(*args, **kwargs):
            if _called_with_cfg(*args, **kwargs):
                return orig_func(**_get_args_from_config(from_config, *args, **kwargs))
            return orig_func(*args, **kwargs)
        wrapped.from_config = from_config
        return wrapped
    return wrapper


# -- fvcore/common/registry.py --------------------------------------------------------------------------------
class Registry:
    def __init__(self, name: str):
        self._name, self._obj_map = name, {}

    def _do_register(self, name: str, obj: Any) -> None:
        assert name not in self._obj_map, f"An object named '{name}' was already registered in '{self._name}'!"
        self._obj_map[name] = obj

    def register(self, obj: Any = None):
        if obj is None:
            def deco(func_or_class):
                self._do_register(func_or_class.__name__, func_or_class)
                return func_or_class
            return deco
        self._do_register(obj.__name__, obj)
        return obj

    def get(self, name: str) -> Any:
        if name not in self._obj_map:
            raise KeyError(f"No object named '{name}' found in '{self._name}' registry!")
        return self._obj_map[name]

    def __contains__(self, name: str) -> bool:
        return name in self._obj_map


# -- detectron2/structures/image_list.py ----------------------------------------------------------------------
class ImageList:
    """Images of (possibly) different sizes padded into one tensor; ``image_sizes`` keeps each (h, w)."""

    def __init__(self, tensor: torch.Tensor, image_sizes: list[tuple[int, int]]):
        self.tensor, self.image_sizes = tensor, image_sizes

    def __len__(self) -> int:
        return len(self.image_sizes)

    def __getitem__(self, idx: int) -> torch.Tensor:
        size = self.image_sizes[idx]
        return self.tensor[idx, ..., : size[0], : size[1]]

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @staticmethod
    def from_tensors(tensors: list[torch.Tensor], size_divisibility: int = 0, pad_value: float = 0.0,
                     padding_constraints: dict | None = None) -> ImageList:
        assert len(tensors) > 0
        image_sizes = [(im.shape[-2], im.shape[-1]) for im in tensors]
        max_size = torch.stack([torch.as_tensor(s) for s in image_sizes]).max(0).values
        if padding_constraints is not None:
            square_size = padding_constraints.get("square_size", 0)
            if square_size > 0:
                max_size[0] = max_size[1] = square_size
            if "size_divisibility" in padding_constraints:
                size_divisibility = padding_constraints["size_divisibility"]
        if size_divisibility > 1:
            stride = size_divisibility
            max_size = (max_size + (stride - 1)).div(stride, rounding_mode="floor") * stride
        if len(tensors) == 1:
            image_size = image_sizes[0]
            padding_size = [0, int(max_size[-1] - image_size[1]), 0, int(max_size[-2] - image_size[0])]
            batched_imgs = F.pad(tensors[0], padding_size, value=pad_value).unsqueeze_(0)
        else:
            batch_shape = [len(tensors)] + list(tensors[0].shape[:-2]) + [int(v) for v in max_size]
            batched_imgs = tensors[0].new_full(batch_shape, pad_value)
            for i, img in enumerate(tensors):
                batched_imgs[i, ..., : img.shape[-2], : img.shape[-1]].copy_(img)
        return ImageList(batched_imgs.contiguous(), image_sizes)


# -- detectron2/modeling/postprocessing.py --------------------------------------------------------------------
def sem_seg_postprocess(result: torch.Tensor, img_size: tuple[int, int], output_height: int, output_width: int):
    """Crop the padding off ``result`` [C, H, W] and resize it bilinearly to the original image size."""
    result = result[:, : img_size[0], : img_size[1]].expand(1, -1, -1, -1)
    return F.interpolate(result, size=(output_height, output_width), mode="bilinear", align_corners=False)[0]


# -- detectron2/data/transforms/augmentation_impl.py and transform.py (the test-time resize) -------------------
class ResizeTransform:
    """detectron2/data/transforms/transform.py ``ResizeTransform``: uint8 images go through
    ``PIL.Image.resize((new_w, new_h), interp)`` (a single-channel image as mode ``L``)."""

    def __init__(self, h: int, w: int, new_h: int, new_w: int, interp: int | None = None):
        from PIL import Image

        self.h, self.w, self.new_h, self.new_w = h, w, new_h, new_w
        self.interp = Image.BILINEAR if interp is None else interp

    def apply_image(self, img, interp: int | None = None):
        from PIL import Image

        assert img.shape[:2] == (self.h, self.w)
        if img.dtype != np.uint8:
            raise NotImplementedError("the stand-in ResizeTransform covers uint8 images (what DatasetMapper reads)")
        single = img.ndim > 2 and img.shape[2] == 1
        pil_image = Image.fromarray(img[:, :, 0], mode="L") if single else Image.fromarray(img)
        ret = np.asarray(pil_image.resize((self.new_w, self.new_h), interp if interp is not None else self.interp))
        return np.expand_dims(ret, -1) if single else ret


class ResizeShortestEdge:
    """detectron2/data/transforms/augmentation_impl.py ``ResizeShortestEdge`` (``sample_style="choice"``; the
    test mapper builds it from ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``, detectron2/data/detection_utils.py
    ``build_augmentation``)."""

    def __init__(self, short_edge_length, max_size: int = 2**31 - 1, sample_style: str = "range",
                 interp: int | None = None):
        from PIL import Image

        assert sample_style in ("range", "choice"), sample_style
        self.is_range = sample_style == "range"
        if isinstance(short_edge_length, int):
            short_edge_length = (short_edge_length, short_edge_length)
        self.short_edge_length, self.max_size = short_edge_length, max_size
        self.interp = Image.BILINEAR if interp is None else interp

    def get_transform(self, image):
        h, w = image.shape[:2]
        if self.is_range:
            size = np.random.randint(self.short_edge_length[0], self.short_edge_length[1] + 1)
        else:
            size = np.random.choice(self.short_edge_length)
        if size == 0:
            raise NotImplementedError("NoOpTransform is not part of the stand-ins")
        newh, neww = ResizeShortestEdge.get_output_shape(h, w, size, self.max_size)
        return ResizeTransform(h, w, newh, neww, self.interp)

    @staticmethod
    def get_output_shape(oldh: int, oldw: int, short_edge_length: int, max_size: int) -> tuple[int, int]:
        h, w = oldh, oldw
        size = short_edge_length * 1.0
        scale = size / min(h, w)
        if h < w:
            newh, neww = size, scale * w
        else:
            newh, neww = scale * h, size
        if max(newh, neww) > max_size:
            scale = max_size * 1.0 / max(newh, neww)
            newh = newh * scale
            neww = neww * scale
        neww = int(neww + 0.5)
        newh = int(newh + 0.5)
        return (newh, neww)


# -- catalogs (detectron2/data/catalog.py): a dict of attribute bags, enough for ``.get(name).set(...)`` ------
class _Metadata(types.SimpleNamespace):
    def set(self, **kwargs: Any) -> _Metadata:
        self.__dict__.update(kwargs)
        return self

    def get(self, key: str, default: Any = None) -> Any:
        return self.__dict__.get(key, default)


class _MetadataCatalog(dict):
    def get(self, name: str) -> _Metadata:  # type: ignore[override]
        return self.setdefault(name, _Metadata(name=name))


class _DatasetCatalog(dict):
    def register(self, name: str, func: Any) -> None:
        self[name] = func

    def get(self, name: str) -> Any:  # type: ignore[override]
        return self[name]()


def detectron2_modules() -> dict[str, types.ModuleType]:
    """Fresh stand-in modules (new registries and catalogs each call, so two imports never collide)."""
    U = _unused
    meta = Registry("META_ARCH")  # detectron2/modeling/meta_arch/build.py
    heads = Registry("SEM_SEG_HEADS")  # detectron2/modeling/meta_arch/semantic_seg.py

    def _build_model(cfg):
        return meta.get(cfg.MODEL.META_ARCHITECTURE)(cfg)

    def _build_sem_seg_head(cfg, input_shape):
        return heads.get(cfg.MODEL.SEM_SEG_HEAD.NAME)(cfg, input_shape)

    metadata, datasets = _MetadataCatalog(), _DatasetCatalog()
    modules = {
        "detectron2": stub_module("detectron2"),
        "detectron2.config": stub_module("detectron2.config", configurable=configurable, CfgNode=CfgNode,
                                         get_cfg=get_cfg),
        "detectron2.data": stub_module("detectron2.data", MetadataCatalog=metadata, DatasetCatalog=datasets,
                                       build_detection_train_loader=U("build_detection_train_loader"),
                                       build_detection_test_loader=U("build_detection_test_loader")),
        "detectron2.data.transforms": stub_module("detectron2.data.transforms", ResizeShortestEdge=ResizeShortestEdge,
                                                  ResizeTransform=ResizeTransform),
        "detectron2.data.datasets": stub_module("detectron2.data.datasets", load_sem_seg=U("load_sem_seg")),
        "detectron2.modeling": stub_module("detectron2.modeling", META_ARCH_REGISTRY=meta,
                                           SEM_SEG_HEADS_REGISTRY=heads, build_model=_build_model,
                                           build_sem_seg_head=_build_sem_seg_head),
        "detectron2.modeling.postprocessing": stub_module("detectron2.modeling.postprocessing",
                                                          sem_seg_postprocess=sem_seg_postprocess),
        "detectron2.structures": stub_module("detectron2.structures", ImageList=ImageList, Instances=U("Instances"),
                                             Boxes=U("Boxes"), PolygonMasks=U("PolygonMasks"), BoxMode=U("BoxMode"),
                                             BitMasks=U("BitMasks")),
        "detectron2.layers": stub_module("detectron2.layers", Conv2d=U("Conv2d"), ShapeSpec=U("ShapeSpec"),
                                         get_norm=U("get_norm")),
        # train_net.py's imports (only Trainer.build_optimizer, a classmethod on cfg and torch, is run)
        "detectron2.utils": stub_module("detectron2.utils"),
        "detectron2.utils.comm": stub_module("detectron2.utils.comm", get_rank=lambda: 0, get_world_size=lambda: 1,
                                             all_gather=U("all_gather"), is_main_process=lambda: True,
                                             synchronize=lambda: None),
        "detectron2.utils.logger": stub_module("detectron2.utils.logger", setup_logger=U("setup_logger")),
        "detectron2.utils.file_io": stub_module("detectron2.utils.file_io", PathManager=U("PathManager")),
        "detectron2.checkpoint": stub_module("detectron2.checkpoint", DetectionCheckpointer=U("DetectionCheckpointer")),
        "detectron2.engine": stub_module("detectron2.engine", DefaultTrainer=U("DefaultTrainer"),
                                         default_argument_parser=U("default_argument_parser"),
                                         default_setup=U("default_setup"), launch=U("launch")),
        "detectron2.evaluation": stub_module("detectron2.evaluation", **{n: U(n) for n in (
            "CityscapesInstanceEvaluator", "CityscapesSemSegEvaluator", "COCOEvaluator", "COCOPanopticEvaluator",
            "DatasetEvaluators", "SemSegEvaluator", "verify_results", "DatasetEvaluator")}),
        "detectron2.projects": stub_module("detectron2.projects"),
        "detectron2.projects.deeplab": stub_module("detectron2.projects.deeplab",
                                                   add_deeplab_config=U("add_deeplab_config"),
                                                   build_lr_scheduler=U("build_lr_scheduler")),
        "detectron2.solver": stub_module("detectron2.solver"),
        "detectron2.solver.build": stub_module("detectron2.solver.build",
                                               maybe_add_gradient_clipping=U("maybe_add_gradient_clipping")),
        # other third-party imports of the model files that the compared path never runs
        "fvcore": stub_module("fvcore"),
        "fvcore.nn": stub_module("fvcore.nn"),
        "fvcore.nn.weight_init": stub_module("fvcore.nn.weight_init"),
        "fast_pytorch_kmeans": stub_module("fast_pytorch_kmeans", KMeans=U("KMeans")),
    }
    return modules
