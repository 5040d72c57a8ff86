"""A transformers model's parts (LLaVA-family or Qwen-VL), its processor's settings, and the encoder of its image path.

:func:`encoder_from_model` builds the :class:`~hrperc.HighResEncoder` that reproduces the model's image
path around its own vision tower, as the model's :class:`~hrperc.integrations.transformers._families.Family`
entry says; :func:`variant` rebuilds an attached encoder with other settings (an image-processor option
such as ``do_pad=False``, another ``vision_feature_layer``) around the same tower and DEM, cached per
setting, so that a processor's options and a forward's arguments are honoured instead of ignored.

Example::

    >>> hf_blocks(-2, 24), hf_blocks(23, 24), hf_blocks(-1, 27)   # transformers' hidden_states index -> blocks run
    (23, 23, 27)
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Any

from torch import nn

from ..._errors import public
from ...backbones.base import resolve_layers
from ...encoder import HighResEncoder
from ...recipes import create_encoder
from ._families import FAMILIES, TABLE, Family, family_of, hf_blocks, recipes_with
from ._pixels import options_key

__all__ = [
    "FAMILIES",
    "encoder_from_model",
    "variant",
    "hf_blocks",
    "ProcessorSettings",
    "tower_of",
    "projector_of",
]

#: The processor option each encoder setting answers to (for messages).
OPTION_NAMES = {
    "pad": "do_pad",
    "mean": "image_mean",
    "std": "image_std",
    "min_tiles": "min_patches",
    "max_tiles": "max_patches",
    "layer": "vision_feature_layer",
    "select_strategy": "vision_feature_select_strategy",
}
_BICUBIC = 3  # PIL's code; transformers' processors of the four families resize bicubic, as hrperc does
_RESAMPLE_NAMES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_MAX_VARIANTS = 32


# --- the model's parts -------------------------------------------------------------------------------
def inner_model(model) -> tuple[Any, Family]:
    """``(inner model holding the vision tower and projector, its Family)`` of a supported transformers model."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = family_of(model_type, getattr(getattr(config, "vision_config", None), "model_type", None))
    if family is None:
        raise TypeError(
            f"model is a {type(model).__name__} (model_type={model_type!r}); pass one of the models hrperc "
            f"integrates: {', '.join(f.model_class for f in TABLE)} (or their *Model)."
        )
    parts = [family.tower] + ([family.projector] if family.projector is not None else [])
    inner = model.model if hasattr(getattr(model, "model", None), family.tower) else model
    if not all(hasattr(inner, name) for name in parts):
        raise TypeError(f"{type(model).__name__} has no {' / '.join(parts)}; pass the full model.")
    return inner, family


def tower_of(inner, family: Family) -> nn.Module:
    """The inner model's vision tower (``family.tower``)."""
    return getattr(inner, family.tower)


def projector_of(inner, family: Family) -> nn.Module | None:
    """The inner model's projector into the LLM; ``None`` when the tower's own merger gives the LLM's width."""
    return getattr(inner, family.projector) if family.projector is not None else None


def module_reference(inner, family: Family):
    """A parameter whose device and dtype the front end's added parts follow: the projector's, else the tower's."""
    return next((projector_of(inner, family) or tower_of(inner, family)).parameters())


def image_processor(processor):
    return getattr(processor, "image_processor", processor) if processor is not None else None


def text_width(model) -> int:
    config = model.config
    text = getattr(config, "text_config", None)
    return int(getattr(text, "hidden_size", None) or config.hidden_size)


def strategy_of(backbone) -> str | None:
    """The ``vision_feature_select_strategy`` hrperc's tokens equal: ``"default"`` (CLS dropped) for one
    prefix token, ``"full"`` for none, ``None`` otherwise (neither keeps exactly the patch tokens)."""
    return {1: "default", 0: "full"}.get(int(getattr(backbone, "num_prefix_tokens", -1)))


def encoder_strategy(encoder) -> str | None:
    """The ``vision_feature_select_strategy`` ``encoder``'s tokens equal: ``"full"`` when its front end keeps the
    tower's prefix tokens (LLaVA-1.5's ``select_strategy="full"``), else :func:`strategy_of` its backbone."""
    if getattr(encoder.front_end, "keeps_prefix", False) and encoder.backbone.num_prefix_tokens:
        return "full"
    return strategy_of(encoder.backbone)


# --- the processor's settings ---------------------------------------------------------------------------
def _kwargs_class(processor):
    """The ``ProcessingKwargs`` class ``processor`` merges its call's options with: ``<Processor>Kwargs`` in its
    own module (transformers < 5.20 passes it to ``_merge_kwargs`` itself), else the first such class there."""
    import sys

    from transformers.processing_utils import ProcessingKwargs

    def kind(v) -> bool:  # a TypedDict: no issubclass; its keys tell
        return isinstance(v, type) and "images_kwargs" in getattr(v, "__annotations__", {})

    module = vars(sys.modules.get(type(processor).__module__, sys))
    named = module.get(f"{type(processor).__name__}Kwargs")
    if kind(named):
        return named
    found = [v for k, v in module.items() if k.endswith("ProcessorKwargs") and kind(v)]
    return found[0] if found else ProcessingKwargs


def merge_kwargs(processor, **kwargs) -> dict | None:
    """``processor._merge_kwargs`` of the call options ``kwargs`` with the processor's defaults (``None``: it has
    none). Its ``ProcessingKwargs`` class is passed as the processors' own ``__call__`` passes it: transformers
    5.20 and later would find it themselves, 5.19 and earlier require it."""
    merge = getattr(processor, "_merge_kwargs", None)
    if merge is None:
        return None
    init = getattr(getattr(processor, "tokenizer", None), "init_kwargs", None) or {}
    kinds = getattr(processor, "valid_processor_kwargs", None) or _kwargs_class(processor)
    return merge(kinds, tokenizer_init_kwargs=init, **kwargs)


def _plain(value):
    """A setting in comparable form: sizes as dicts of their set fields, sequences as tuples, resampling as
    PIL's code, tensors / arrays as lists."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple, dict)):
        return _plain(value.tolist())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if hasattr(value, "__dataclass_fields__"):  # transformers' SizeDict
        return {k: _plain(getattr(value, k)) for k in value.__dataclass_fields__ if getattr(value, k) is not None}
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    name = getattr(value, "value", None)
    if isinstance(name, int):  # PILImageResampling
        return int(name)
    if isinstance(name, str) and name.lower() in _RESAMPLE_NAMES:  # torchvision InterpolationMode
        return _RESAMPLE_NAMES[name.lower()]
    return repr(value)


def same_setting(a, b) -> bool:
    return _plain(a) == _plain(b)


class ProcessorSettings:
    """The image settings an original processor applies when called without options: its processor-level
    ``images_kwargs`` defaults (InternVL's ``crop_to_patches=True``, say) over its image processor's
    attributes."""

    def __init__(self, processor) -> None:
        self.processor, self.ip = processor, image_processor(processor)
        self.defaults: dict = {}
        tokenizer = getattr(processor, "tokenizer", None)
        merged = merge_kwargs(processor) if tokenizer is not None and self.ip is not processor else None
        if merged is not None:
            self.defaults = dict(merged["images_kwargs"])
            self.defaults.pop("return_tensors", None)

    def get(self, name: str, default=None):
        if name in self.defaults:
            return self.defaults[name]
        value = getattr(self.ip, name, None) if self.ip is not None else None
        return default if value is None else value

    @property
    def squares(self) -> bool:
        """Whether ``do_pad`` pads each image to a square (LLaVA's image processor), rather than padding a
        batch to one size (CLIP's and the others', which does not change an image)."""
        return self.ip is not None and callable(getattr(self.ip, "pad_to_square", None))


def _size_of(value):
    """A processor size setting -> ``(h, w)``, ``None`` when unset, or the setting itself when it is
    neither ``height``/``width`` nor ``shortest_edge``."""
    plain = _plain(value)
    if not plain:
        return None
    if isinstance(plain, dict):
        if plain.get("height") and plain.get("width"):
            return int(plain["height"]), int(plain["width"])
        if plain.get("shortest_edge") and set(plain) <= {"shortest_edge"}:
            return (int(plain["shortest_edge"]),) * 2
    return plain


def _check_processor(settings: ProcessorSettings, tile, family: Family, pad: bool) -> None:
    """The processor's steps must be ones hrperc's recipe reproduces: tiles of the tower's size (``tile``;
    ``None`` for a native-resolution family, whose budget a reader takes), bicubic resizing, rescale by
    1/255, normalization; the centre crop when a square-padding family does not pad."""
    for name in ("size", "crop_size") if tile is not None else ():
        if name == "crop_size" and family.crop_size_with_center_crop and not settings.get("do_center_crop", True):
            continue
        size = _size_of(settings.get(name))
        if size is not None and size != tuple(tile):
            raise ValueError(
                f"the processor's {name}={_plain(settings.get(name))} gives tiles other than the vision "
                f"tower's {tile[0]}x{tile[1]}; the model would see resized tiles hrperc does not reproduce. Use the "
                f"processor saved with the model."
            )
    steps = {"do_resize": True, "do_rescale": True, "do_normalize": True}
    if family.square_pad and not pad:
        steps["do_center_crop"] = True
    for name, needed in steps.items():
        value = settings.get(name)
        if value is not None and bool(value) != needed:
            raise ValueError(
                f"the processor has {name}={value!r}; hrperc's {family.recipe} recipe always does this step "
                f"(as the model's processor does by default). Use a processor with {name}={needed}."
            )
    factor = settings.get("rescale_factor")
    if factor is not None and not math.isclose(float(factor), 1 / 255, rel_tol=1e-9):
        raise ValueError(
            f"the processor has rescale_factor={factor!r}; hrperc reads pixels as value / 255. Use a processor "
            f"with rescale_factor=1/255."
        )
    resample = settings.get("resample")
    if resample is not None and not family.resample_read and _plain(resample) != _BICUBIC:
        raise ValueError(
            f"the processor has resample={resample!r}; hrperc's recipes resize bicubic, as these models' "
            f"processors do. Use a processor with resample=3 (bicubic)."
        )


# --- encoder_from_model ------------------------------------------------------------------------------
@public
def encoder_from_model(model, processor=None, **options) -> HighResEncoder:
    """The :class:`~hrperc.HighResEncoder` that reproduces ``model``'s image path, around its own vision tower.

    Reads the model's config (``vision_feature_layer``, ``vision_feature_select_strategy``,
    ``image_grid_pinpoints``, ``vision_aspect_ratio``, ``downsample_ratio``) and, when given, the
    processor's image settings (``image_mean`` / ``image_std``; LLaVA's ``do_pad``, which pads to a square
    only in LLaVA's own image processor -- a ``CLIPImageProcessor`` resizes the shortest edge and
    centre-crops; InternVL's ``crop_to_patches`` / ``min_patches`` / ``max_patches``, processor-level
    defaults included; without a processor, the image-processor class defaults of transformers). The
    tower is shared, not copied. ``options`` go to :func:`hrperc.create_encoder` and override what was
    read (e.g. ``dcm=True`` to add the DEM).

    Qwen2-VL, Qwen2.5-VL and Qwen3-VL (``model.model.visual``): the processor's ``size["shortest_edge"]`` /
    ``size["longest_edge"]`` become ``min_pixels`` / ``max_pixels`` and its ``image_mean`` / ``image_std``
    the normalization (without a processor: the released checkpoints' budget and normalization, the
    recipes' defaults); the tower's last block through its merger, as the model reads it.

    Pixtral-12B (a ``LlavaForConditionalGeneration`` whose ``vision_config.model_type`` is ``"pixtral"``) and
    Mistral 3 (``Mistral3ForConditionalGeneration``): the ``pixtral`` recipe, ``longest_edge`` from the
    processor's ``size``, ``merge_size`` from the config's ``spatial_merge_size`` (1 for LLaVA), the
    normalization from the processor; LLaVA must have ``vision_feature_select_strategy="full"`` (``"default"``
    would drop the first patch of a tower with no class token).

    LLaVA-1.5, LLaVA-NeXT and OneVision (:attr:`Family.feature_select`): a list ``vision_feature_layer`` becomes
    the recipe's ``layer=[...]`` (the layers concatenated on the channels, in the config's order) and
    ``vision_feature_select_strategy="full"`` on a tower with a class token its ``select_strategy="full"``
    (the class token kept: LLaVA-1.5 only; the tiling recipes refuse it, as transformers fails there).

    Refused, with the reason: a list of feature layers for another family, a list with a repeated or
    out-of-range entry, a selection strategy that keeps a CLS token (but LLaVA-1.5's) or drops a patch
    token, a processor whose tiles are not the tower's size or whose
    steps hrperc does not reproduce (``do_resize=False``, another ``resample``, ``rescale_factor`` or
    ``do_normalize=False``), an InternViT whose last layer goes through a final LayerNorm
    (``use_mean_pooling=False``), and a Qwen processor whose ``patch_size`` / ``merge_size`` /
    ``temporal_patch_size`` differ from the tower's or whose ``size`` holds no pixel budget, a Pixtral processor
    whose ``patch_size`` / ``spatial_merge_size`` differ from the model's or whose ``size`` has no ``longest_edge``.
    """
    inner, family = inner_model(model)
    config, tower = model.config, tower_of(inner, family)
    layer: Any = config.vision_feature_layer if family.feature_layer else -1
    several = isinstance(layer, (list, tuple)) and family.feature_select
    if several:
        layer = list(layer)
    elif not isinstance(layer, int) or isinstance(layer, bool):
        raise ValueError(
            f"the model's vision_feature_layer={layer!r} concatenates several layers; hrperc's {family.recipe} "
            f"encoder reads one layer, as {family.model_class} does. Use a model with an int vision_feature_layer."
        )
    settings = ProcessorSettings(processor) if processor is not None else None
    mean = tuple(settings.get("image_mean")) if settings and settings.get("image_mean") is not None else None
    std = tuple(settings.get("image_std")) if settings and settings.get("image_std") is not None else None
    try:
        backbone = family.backbone(tower, layer=layer, mean=mean, std=std)
    except (TypeError, ValueError) as e:
        if not several:
            raise
        raise ValueError(f"the model's vision_feature_layer={layer!r} cannot be read: {e}") from None
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    keep_cls = family.feature_select and strategy == "full" and backbone.num_prefix_tokens == 1
    if family.feature_layer and family.select_strategy and strategy != strategy_of(backbone) and not keep_cls:
        prefix = backbone.num_prefix_tokens
        raise ValueError(
            f"vision_feature_select_strategy={strategy!r} with a tower of {prefix} prefix token(s): the model "
            f"{'drops its first patch token' if strategy == 'default' else 'keeps the CLS token'}, which hrperc's "
            f"{family.recipe} encoder does not reproduce (it returns the patch tokens). Use 'default' with CLIP / "
            f"InternViT and 'full' with SigLIP and Pixtral."
        )
    kw = family.recipe_options(config, settings)
    entries: list = layer if several else [layer]
    for entry in entries:
        family.check_tower(tower, entry, backbone.num_layers, f"vision_feature_layer={layer}")
    if settings is not None:
        _check_processor(settings, backbone.image_size if family.tiles else None, family, kw.get("pad", False))
    if several:
        kw["layer"] = layer
    if keep_cls:
        kw["select_strategy"] = "full"
    kw.update(options)
    try:
        encoder = create_encoder(family.recipe, backbone, **kw)
    except ValueError as e:
        if not keep_cls or kw.get("select_strategy") != "full" or "select_strategy" not in str(e):
            raise
        # the recipe's refusal (a tiling recipe cannot hold the class token), named by the model's setting
        raise ValueError(f"the model's vision_feature_select_strategy='full': {e}") from None
    n = backbone.num_layers
    if family.feature_layer and "layer" not in kw and resolve_layers(encoder.layer, n) != resolve_layers(layer, n):
        # the config's layer where the recipe's default is another (recipe_options name it only then)
        encoder = create_encoder(family.recipe, backbone, **kw, layer=layer)
    return encoder


# --- variants of an attached encoder -----------------------------------------------------------------------
class ModuleState:
    """A module's ``requires_grad`` flags, train/eval modes and gradient-checkpointing switches, to
    :meth:`restore` later: building an encoder around a shared tower sets them, and the tower is the model's."""

    def __init__(self, module: nn.Module) -> None:
        self.grads = [(p, p.requires_grad) for p in module.parameters()]
        self.modes = [(m, m.training) for m in module.modules()]
        self.ckpt = [
            (m, m.__dict__.get("gradient_checkpointing"), m.__dict__.get("_gradient_checkpointing_func"))
            for m in module.modules()
            if "gradient_checkpointing" in m.__dict__
        ]

    def restore(self) -> None:
        for p, flag in self.grads:
            p.requires_grad_(flag)
        for m, flag in self.modes:
            m.training = flag
        for m, on, func in self.ckpt:
            setattr(m, "gradient_checkpointing", on)  # noqa: B010  (nn.Module's typing refuses plain attributes)
            if func is None:
                m.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                setattr(m, "_gradient_checkpointing_func", func)  # noqa: B010


@contextlib.contextmanager
def kept_state(module: nn.Module):
    """Run the block, then put ``module``'s :class:`ModuleState` back."""
    state = ModuleState(module)
    try:
        yield
    finally:
        state.restore()


_VARIANTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _refuse_setting(key: str, value, why: str) -> ValueError:
    return ValueError(f"{OPTION_NAMES.get(key, key)}={value!r}: {why}. Drop {OPTION_NAMES.get(key, key)}.")


def _validate_changes(encoder: HighResEncoder, changes: dict, family: Family | None = None) -> dict:
    """``changes`` (``pad``, ``mean``, ``std``, ``min_tiles``, ``max_tiles``, ``layer``, and ``family``'s
    ``call_options``) checked against what ``encoder`` can be rebuilt with; returns them in canonical form."""
    out: dict = {}
    for key, value in changes.items():
        if key == "pad":
            if not isinstance(value, bool):
                raise _refuse_setting(key, value, "must be True or False")
            has = recipes_with(key)
            if encoder.recipe not in has:
                raise _refuse_setting(
                    key,
                    value,
                    f"the attached encoder (recipe {encoder.recipe!r}) has no pad-to-square setting, only {has} do",
                )
        elif key in ("min_tiles", "max_tiles"):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _refuse_setting(key, value, "must be an int >= 1")
            has = recipes_with(key)
            if encoder.recipe not in has:
                raise _refuse_setting(
                    key,
                    value,
                    f"the attached encoder (recipe {encoder.recipe!r}) has no InternVL tiling, only {has} do",
                )
        elif key in ("mean", "std"):
            try:
                value = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3)]
            except (TypeError, ValueError):
                value = []
            if len(value) != 3 or not all(math.isfinite(v) for v in value) or (key == "std" and min(value) <= 0):
                raise _refuse_setting(
                    key,
                    changes[key],
                    "must be three finite floats (R, G, B)" + (", all > 0" if key == "std" else ""),
                )
        elif key == "layer":
            entries = value if isinstance(value, (list, tuple)) else [value]
            if not entries or not all(isinstance(v, int) and not isinstance(v, bool) for v in entries):
                raise _refuse_setting(key, value, "must be an int, or a list of ints (layers concatenated)")
            value = list(value) if isinstance(value, (list, tuple)) else value
        elif family is not None and key in family.call_options:
            pass  # a recipe option of the processor's name (Gemma 3's pan and scan): the rebuilt recipe checks it
        else:
            raise ValueError(
                f"the encoder setting {key!r} is not one hrperc rebuilds an attached encoder with; the settings "
                f"are {sorted(OPTION_NAMES)}. Pack the images with the processor attach() returned."
            )
        out[key] = value
    return out


def variant(encoder: HighResEncoder, changes: dict, family: Family) -> HighResEncoder:
    """``encoder`` rebuilt with ``changes`` (see :func:`_validate_changes`) around the same tower and DEM;
    ``encoder`` itself for no changes. Variants are cached per encoder and setting."""
    if not changes:
        return encoder
    changes = _validate_changes(encoder, changes, family)
    key = options_key(changes)
    cache = _VARIANTS.setdefault(encoder, {})
    if key in cache:
        return cache[key]
    bb = encoder.backbone
    if encoder.recipe is None or not isinstance(bb, family.backbone):
        name = OPTION_NAMES.get(next(iter(changes)), next(iter(changes)))
        raise ValueError(
            f"{name}={changes[next(iter(changes))]!r} needs the attached encoder rebuilt with it, but it was "
            f"not built by hrperc.create_encoder around the model's kind of tower ({family.backbone.__name__}). "
            f"Drop {name}, or attach an encoder built by encoder_from_model / create_encoder."
        )
    layer = changes.get("layer", encoder.layer)
    try:
        blocks = resolve_layers(layer, bb.num_layers)
    except (TypeError, ValueError) as e:
        raise _refuse_setting("layer", layer, f"the tower has {bb.num_layers} layers ({e})") from None
    for entry in layer if isinstance(layer, (list, tuple)) else [layer]:
        family.check_tower(bb.model, entry, bb.num_layers, f"vision_feature_layer={layer}")
    options = dict(encoder.recipe_options)
    options["layer"] = layer if blocks != resolve_layers(encoder.layer, bb.num_layers) else encoder.layer
    for name in ("pad", "min_tiles", "max_tiles", *family.call_options):
        if name in changes:
            options[name] = changes[name]
    options["dem"] = encoder.dem  # the same DEM, or None: never a fresh random one
    mean, std = changes.get("mean", bb.mean), changes.get("std", bb.std)
    with kept_state(bb.model):
        try:
            built = create_encoder(
                encoder.recipe, family.backbone(bb.model, layer=options["layer"], mean=mean, std=std), **options
            )
        except (TypeError, ValueError) as e:
            names = ", ".join(f"{OPTION_NAMES.get(k, k)}={v!r}" for k, v in changes.items())
            raise ValueError(f"{names} cannot be honoured: {e}") from None
    if len(cache) >= _MAX_VARIANTS:
        cache.pop(next(iter(cache)))
    cache[key] = built
    return built
