"""hrperc as the image path of a transformers LLaVA-family model: reproduce it, then upgrade it.

Four model classes (and their ``*Model`` bases): ``LlavaForConditionalGeneration``,
``LlavaNextForConditionalGeneration``, ``LlavaOnevisionForConditionalGeneration`` and
``InternVLForConditionalGeneration``. Three calls (``docs/transformers.md`` has the walk-through):

* :func:`encoder_from_model` -- the :class:`~hrperc.HighResEncoder` of the model's own front end (the
  recipe of its family, its vision tower shared, its layer, CLS, pinpoints, tiling and normalization);
* :func:`attach` -- the model and a processor that run a given encoder as the model's image path:
  ``model(**processor(images=..., text=..., return_tensors="pt"))`` and ``model.generate(...)``;
* :func:`save_front_end` / :func:`load_front_end` -- the trained front-end weights (a DEM, a new
  projector) in safetensors next to the model's ``save_pretrained`` output, and the attached model
  restored from the two.

How an attached model runs. The processor returned by :func:`attach` tokenizes the text with the
original processor's tokenizer and expands each image placeholder to ``encoder.num_tokens((H, W))``
tokens (InternVL: inside ``<img>`` / ``</img>``). It does not resample the images: ``pixel_values`` holds
the images themselves, ``(B, 3, H_max, W_max)`` int16 (uint8 values) or float32 (``[0, 1]`` values),
padded with ``-1`` (a value no pixel has, so each image's size is read back from the tensor itself and
survives ``generate``, batching and ``.to(device, dtype)``), plus ``image_sizes``. The model's
``get_image_features`` is replaced (on this model object only) by the encoder:
``encoder(images, project=projector, newline=image_newline)``, whose tokens fill the placeholders as
the model's own features did. Everything else -- the LLM, labels, attention masks, the KV cache,
``generate`` -- is the unmodified model's code.

Example::

    >>> from hrperc.integrations.transformers import encoder_from_model, attach     # doctest: +SKIP
    >>> model = LlavaNextForConditionalGeneration.from_pretrained(path)              # doctest: +SKIP
    >>> processor = AutoProcessor.from_pretrained(path)                              # doctest: +SKIP
    >>> model, proc = attach(model, processor, encoder_from_model(model, processor)) # doctest: +SKIP
    >>> out = model.generate(**proc(images=image, text=prompt, return_tensors="pt")) # doctest: +SKIP
"""

from __future__ import annotations

import json
import types
import warnings
from pathlib import Path

import torch
from torch import nn

from ..backbones.hf_vit import HFBackbone
from ..encoder import HighResEncoder
from ..modules.dem import DualPerspectiveEnhancement
from ..modules.projector import build_projector
from ..ops.pixels import to_pixels
from ..ops.preprocess import to_unit
from ..recipes import create_encoder

__all__ = [
    "encoder_from_model",
    "attach",
    "AttachedProcessor",
    "pack_images",
    "unpack_images",
    "save_front_end",
    "load_front_end",
    "FAMILIES",
]

#: transformers ``model_type`` -> the hrperc recipe that reproduces its image path.
FAMILIES = {
    "llava": "llava15",
    "llava_next": "llava_next",
    "llava_onevision": "llava_onevision",
    "internvl": "internvl",
}
_FRONT_END_FILE, _CONFIG_FILE = "hrperc_front_end.safetensors", "hrperc_front_end.json"
_PAD = -1  # the padding value of packed pixels: no uint8 or [0, 1] pixel has it


# --- the model's parts -------------------------------------------------------------------------------
def _inner(model, fn: str):
    """``(inner model with vision_tower / projector, family)`` of a supported transformers model."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise TypeError(
            f"{fn}: model is a {type(model).__name__} (model_type={family!r}); pass one of the LLaVA-family "
            f"models hrperc integrates: LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, "
            f"LlavaOnevisionForConditionalGeneration, InternVLForConditionalGeneration (or their *Model)."
        )
    inner = model.model if hasattr(getattr(model, "model", None), "vision_tower") else model
    if not hasattr(inner, "vision_tower") or not hasattr(inner, "multi_modal_projector"):
        raise TypeError(
            f"{fn}: {type(model).__name__} has no vision_tower / multi_modal_projector; pass the full model."
        )
    return inner, family


def _image_processor(processor):
    return getattr(processor, "image_processor", processor) if processor is not None else None


def _projector_in_features(projector: nn.Module) -> int | None:
    for module in projector.modules():
        if isinstance(module, nn.LayerNorm):
            return int(module.normalized_shape[0])
        if isinstance(module, nn.Linear):
            return module.in_features
    return None


def _text_width(model) -> int:
    config = model.config
    text = getattr(config, "text_config", None)
    return int(getattr(text, "hidden_size", None) or config.hidden_size)


# --- encoder_from_model ------------------------------------------------------------------------------
def encoder_from_model(model, processor=None, **options) -> HighResEncoder:
    """The :class:`~hrperc.HighResEncoder` that reproduces ``model``'s image path, around its own vision tower.

    Reads the model's config (``vision_feature_layer``, ``vision_feature_select_strategy``,
    ``image_grid_pinpoints``, ``vision_aspect_ratio``, ``downsample_ratio``) and, when given, the
    processor's image settings (``image_mean`` / ``image_std``, LLaVA's ``do_pad``, InternVL's
    ``crop_to_patches`` / ``min_patches`` / ``max_patches``; without a processor, the image-processor
    class defaults of transformers). The tower is shared, not copied. ``options`` go to
    :func:`hrperc.create_encoder` and override what was read (e.g. ``dcm=True`` to add the DEM).

    Refused, with the reason: a list of feature layers (concatenated layers), a selection strategy that
    keeps a CLS token or drops a patch token, a processor whose tiles are not the tower's size, and an
    InternViT whose last layer goes through a final LayerNorm (``use_mean_pooling=False``).
    """
    fn = "encoder_from_model"
    inner, family = _inner(model, fn)
    config, tower = model.config, inner.vision_tower
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(
            f"{fn}: the model's vision_feature_layer={layer!r} concatenates several layers; hrperc's encoders read "
            f"one layer. Use a model with an int vision_feature_layer."
        )
    ip = _image_processor(processor)
    mean = tuple(ip.image_mean) if getattr(ip, "image_mean", None) is not None else None
    std = tuple(ip.image_std) if getattr(ip, "image_std", None) is not None else None
    backbone = HFBackbone(tower, layer=layer, mean=mean, std=std)
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    prefix = backbone.num_prefix_tokens
    if (strategy == "default" and prefix != 1) or (strategy == "full" and prefix != 0):
        raise ValueError(
            f"{fn}: vision_feature_select_strategy={strategy!r} with a tower of {prefix} prefix token(s): the model "
            f"{'drops its first patch token' if strategy == 'default' else 'keeps the CLS token'}, which hrperc "
            f"does not reproduce (its encoders return the patch tokens). Use 'default' with CLIP / InternViT and "
            f"'full' with SigLIP."
        )
    tile = backbone.image_size
    if ip is not None:
        _check_processor_tile(ip, tile, fn)
    recipe = FAMILIES[family]
    kw: dict = {}
    if family == "llava":
        kw["pad"] = bool(getattr(ip, "do_pad", False)) if ip is not None else False
    elif family in ("llava_next", "llava_onevision"):
        pinpoints = [tuple(p) for p in config.image_grid_pinpoints]
        ip_points = getattr(ip, "image_grid_pinpoints", None)
        if ip_points is not None and [tuple(p) for p in ip_points] != pinpoints:
            raise ValueError(
                f"{fn}: the processor's image_grid_pinpoints {ip_points} differ from the model's {pinpoints}; the "
                f"model's own code would then unpad with other grids. Use the processor saved with the model."
            )
        kw["pinpoints"] = pinpoints
        if family == "llava_onevision":
            kw["max_tiles"] = int(
                str(getattr(config, "vision_aspect_ratio", "anyres_max_9")).replace("anyres_max_", "")
            )
    else:  # internvl
        kw["downsample"] = round(1 / config.downsample_ratio)
        crop = getattr(ip, "crop_to_patches", True) if ip is not None else True
        kw["max_tiles"] = int(getattr(ip, "max_patches", 12)) if crop else 1
        kw["min_tiles"] = int(getattr(ip, "min_patches", 1)) if crop else 1
        norm = getattr(tower, "layernorm", None)
        if layer == -1 and norm is not None and not isinstance(norm, nn.Identity):
            raise ValueError(
                f"{fn}: this InternViT applies a final LayerNorm to its last layer (use_mean_pooling=False), which "
                f"InternVLModel reads for vision_feature_layer=-1 and hrperc's layer -1 does not include. Use a "
                f"tower with use_mean_pooling=True (InternVL's checkpoints), or another vision_feature_layer."
            )
    kw.update(options)
    return create_encoder(recipe, backbone, **kw)


def _check_processor_tile(ip, tile, fn: str) -> None:
    """The processor's tile (crop / size) must be the tower's input size."""
    sizes = []
    for name in ("crop_size", "size"):
        value = getattr(ip, name, None)
        if isinstance(value, dict) or hasattr(value, "height") or hasattr(value, "shortest_edge"):
            get = value.get if isinstance(value, dict) else (lambda k, v=value: getattr(v, k, None))
            if get("height") and get("width"):
                sizes.append((name, (int(get("height")), int(get("width")))))
            elif get("shortest_edge"):
                sizes.append((name, (int(get("shortest_edge")),) * 2))
    for name, size in sizes[:1]:
        if size != tuple(tile):
            raise ValueError(
                f"{fn}: the processor's {name} gives {size[0]}x{size[1]} tiles but the vision tower takes "
                f"{tile[0]}x{tile[1]}; the model would see resized tiles hrperc does not reproduce. Use the "
                f"processor saved with the model."
            )


# --- pixels through the model's kwargs -----------------------------------------------------------------
def pack_images(images) -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> ``(pixel_values, image_sizes)``: ``(B, 3, H_max, W_max)`` padded with ``-1`` (int16 holding
    uint8 pixels, or float32 holding ``[0, 1]`` pixels when any image is float) and ``(B, 2)`` sizes.

    Example::

        >>> import torch
        >>> px, sizes = pack_images([torch.zeros(3, 4, 6, dtype=torch.uint8), torch.ones(3, 5, 2, dtype=torch.uint8)])
        >>> px.shape, px.dtype, sizes.tolist(), [tuple(i.shape) for i in unpack_images(px)]
        (torch.Size([2, 3, 5, 6]), torch.int16, [[4, 6], [5, 2]], [(3, 4, 6), (3, 5, 2)])
    """
    pixels = to_pixels(images if isinstance(images, (list, tuple)) else [images], keep_uint8=True, one_dtype=False)
    pixels = list(pixels) if isinstance(pixels, torch.Tensor) else pixels
    integer = all(p.dtype == torch.uint8 for p in pixels)
    dtype = torch.int16 if integer else torch.float32
    H, W = max(p.shape[-2] for p in pixels), max(p.shape[-1] for p in pixels)
    out = torch.full((len(pixels), 3, H, W), _PAD, dtype=dtype)
    for b, p in enumerate(pixels):  # one copy per image, in the processor (not a model hot path)
        out[b, :, : p.shape[-2], : p.shape[-1]] = p.to(dtype) if integer else to_unit(p)
    sizes = torch.tensor([list(p.shape[-2:]) for p in pixels], dtype=torch.long)
    return out, sizes


def unpack_images(pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """``pixel_values`` from :func:`pack_images` (any device or float dtype) -> the images, uint8 or float."""
    fn = "attached get_image_features"
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
        raise ValueError(
            f"{fn}: pixel_values has shape {getattr(pixel_values, 'shape', None)}; an attached model takes the "
            f"(B, 3, H, W) images of the processor attach() returned. Use that processor, not the original one."
        )
    integer = not pixel_values.is_floating_point()
    if not integer and (bool((pixel_values > 1).any()) or bool((pixel_values < _PAD).any())):
        raise ValueError(
            f"{fn}: float pixel_values outside [-1, 1]: not the attached processor's packed images (those are int16 "
            f"uint8 pixels, or float [0, 1] pixels, padded with -1; the original processor's are normalized). Use "
            f"the processor attach() returned, and keep int16 pixel_values int16."
        )
    valid = pixel_values[:, 0] >= 0
    rows, cols = valid.any(2).sum(1).tolist(), valid.any(1).sum(1).tolist()
    out = []
    for b, (h, w) in enumerate(zip(rows, cols)):
        img = pixel_values[b, :, :h, :w]
        out.append(img.to(torch.uint8) if integer else img.float())
    return out


# --- attach ---------------------------------------------------------------------------------------------
class _FrontEndState(nn.Module):
    """The trainable front-end parts an attachment adds to the model: ``dem`` and a new ``projector``."""

    def __init__(self, dem, projector) -> None:
        super().__init__()
        self.dem = dem
        self.projector = projector


def attach(model, processor, encoder: HighResEncoder, *, projector: nn.Module | None = None):
    """Run ``encoder`` as ``model``'s image path; returns ``(model, AttachedProcessor)`` (``processor=None``:
    ``(model, None)``, for callers who build ``input_ids`` themselves -- each image placeholder repeated
    ``encoder.num_tokens((H, W))`` times -- and ``pixel_values`` with :func:`pack_images`).

    ``model`` is modified in place (and returned): its ``get_image_features`` runs the encoder, whose tokens
    go through the model's projector -- or, when the encoder's ``token_width`` is not the projector's
    input width, through ``projector`` or a new ``mlp2x_gelu`` one (created, warned about, trainable);
    newline slots get the model's ``image_newline``. The encoder's DEM and a new projector are registered
    under ``model.hrperc_front_end`` (so ``.to()``, ``.parameters()`` and optimizers see them) and left out
    of ``model.save_pretrained`` (:func:`save_front_end` saves them). The encoder's backbone should be the
    model's own vision tower (as :func:`encoder_from_model` and ``create_encoder(..., model.model.vision_tower)``
    build it); hrperc freezes it unless the encoder was built with ``train_backbone=True``.
    """
    fn = "attach"
    inner, family = _inner(model, fn)
    if not isinstance(encoder, HighResEncoder):
        raise TypeError(
            f"{fn}: encoder is a {type(encoder).__name__}; pass a HighResEncoder, e.g. "
            f"encoder_from_model(model, processor) or hrperc.create_encoder('inf_llava', model.model.vision_tower)."
        )
    if getattr(inner, "_hrperc_encoder", None) is not None:
        raise ValueError(f"{fn}: this model already has an hrperc encoder attached; attach to a fresh model.")
    model_projector = inner.multi_modal_projector
    expected, width = _projector_in_features(model_projector), encoder.token_width
    new_projector = None
    if projector is not None:
        new_projector = projector
    elif expected is not None and expected != width:
        new_projector = build_projector("mlp2x_gelu", width, _text_width(model))
        new_projector.to(
            device=next(model_projector.parameters()).device, dtype=next(model_projector.parameters()).dtype
        )
        warnings.warn(
            f"attach: the encoder's tokens have width {width} but the model's projector takes {expected}; a new "
            f"mlp2x_gelu projector {width} -> {_text_width(model)} was created (model.hrperc_front_end.projector). "
            f"Train it (stage 1) before use.",
            stacklevel=2,
        )
    state = _FrontEndState(encoder.dem, new_projector)
    model.hrperc_front_end = state  # registered on the model the caller holds: .to(), .parameters(), optimizers
    object.__setattr__(inner, "_hrperc_state", state)  # plain references: the encoder's backbone is the tower
    object.__setattr__(inner, "_hrperc_encoder", encoder)
    if encoder.dem is not None:
        encoder.dem.to(device=encoder.backbone.device)
    ignore = {f"hrperc_front_end.{k}" for k in state.state_dict()}
    model._keys_to_ignore_on_save = set(getattr(model, "_keys_to_ignore_on_save", None) or ()) | ignore
    inner.get_image_features = types.MethodType(_attached_image_features(family), inner)
    return model, (None if processor is None else AttachedProcessor(processor, encoder, family))


def _attached_image_features(family: str):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    def get_image_features(self, pixel_values, *args, **kwargs):
        encoder = self._hrperc_encoder
        state = self._hrperc_state
        projector = state.projector if state.projector is not None else self.multi_modal_projector
        dtype = next(projector.parameters()).dtype

        def project(x):  # the encoder's tokens (its DEM's dtype) into the projector's dtype
            return projector(x.to(dtype))

        newline = getattr(self, "image_newline", None)
        images = unpack_images(pixel_values)
        out = encoder(images, project=project, newline=newline)
        feats = [out.tokens[b, :n] for b, n in enumerate(out.num_tokens)]
        pooled = torch.cat(feats)[None] if family == "internvl" else feats
        return BaseModelOutputWithPooling(pooler_output=pooled)

    return get_image_features


class AttachedProcessor:
    """The processor of an attached model: the original tokenizer and chat template, hrperc's token counts.

    ``processor(images=..., text=..., **tokenizer_kwargs)`` -> ``BatchFeature`` with ``input_ids``,
    ``attention_mask`` (the tokenizer's), ``pixel_values`` (:func:`pack_images`) and ``image_sizes``. The
    ``i``-th image placeholder of the text (the original processor's ``image_token``) becomes
    ``encoder.num_tokens`` of the ``i``-th image. Other attributes (``tokenizer``, ``decode``,
    ``batch_decode``, ``apply_chat_template`` with ``tokenize=False``, ...) are the original processor's.
    """

    def __init__(self, processor, encoder: HighResEncoder, family: str) -> None:
        self.processor, self.encoder, self.family = processor, encoder, family
        self.image_token = processor.image_token

    def __getattr__(self, name):
        if name in ("processor", "encoder", "family", "image_token"):
            raise AttributeError(name)
        return getattr(self.processor, name)

    def _text_kwargs(self, kwargs: dict) -> dict:
        """The tokenizer kwargs the original processor would use: its defaults (InternVL pads on the left)
        merged with the caller's."""
        merge = getattr(self.processor, "_merge_kwargs", None)
        if merge is None:
            return kwargs
        tokenizer = self.processor.tokenizer
        merged = merge(tokenizer_init_kwargs=getattr(tokenizer, "init_kwargs", {}), **kwargs)["text_kwargs"]
        merged.pop("return_tensors", None)
        for key in ("return_mm_token_type_ids", "return_text_replacement_offsets"):
            merged.pop(key, None)
        return merged

    def replacement(self, image_size) -> str:
        """The text that stands for one image of ``(H, W)`` pixels."""
        n = self.encoder.num_tokens(tuple(int(v) for v in image_size))
        if self.family == "internvl":
            return f"{self.processor.start_image_token}{self.image_token * n}{self.processor.end_image_token}"
        return self.image_token * n

    def __call__(self, images=None, text=None, **kwargs):
        from transformers.feature_extraction_utils import BatchFeature

        fn = "AttachedProcessor"
        return_tensors = kwargs.pop("return_tensors", None)
        flat = _flat_images(images)
        data = {}
        if flat:
            pixel_values, sizes = pack_images(flat)
            data.update(pixel_values=pixel_values, image_sizes=sizes)
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            found = sum(t.count(self.image_token) for t in texts)
            if found != len(flat):
                raise ValueError(
                    f"{fn}: the text holds {found} image placeholder(s) {self.image_token!r} but {len(flat)} image(s) "
                    f"were given; pass one placeholder per image, in order."
                )
            if self.family == "llava_onevision" and any(t.count(self.image_token) > 1 for t in texts):
                raise ValueError(
                    f"{fn}: a text holds several images; LLaVA-OneVision encodes multi-image prompts another way "
                    f"(one square view each), which hrperc's llava_onevision recipe does not reproduce. Pass one "
                    f"image per text."
                )
            replacements = iter([self.replacement(s) for s in (data["image_sizes"].tolist() if flat else [])])
            expanded = []
            for t in texts:
                parts = t.split(self.image_token)
                expanded.append(parts[0] + "".join(next(replacements) + p for p in parts[1:]))
            data.update(self.processor.tokenizer(expanded, **self._text_kwargs(kwargs)))
        return BatchFeature(data, tensor_type=return_tensors)


def _flat_images(images) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [img for item in images for img in _flat_images(item)] if images else []
    return [images]


# --- save and restore ---------------------------------------------------------------------------------
def _dem_config(dem) -> dict | None:
    if dem is None:
        return None
    keys = ("dim", "heads", "pairing", "shared_attention", "residual_norm", "directions", "reduction", "skip_unread")
    config = {k: getattr(dem, k) for k in keys}
    config["fusion"] = dem.fusion.mode
    config["output_size"] = list(dem.output_size) if dem.output_size is not None else None
    return config


def save_front_end(model, directory) -> Path:
    """Write the attached front end next to ``model.save_pretrained(directory)``'s output: its weights
    (``hrperc_front_end.safetensors``: the DEM and a new projector) and how to rebuild it
    (``hrperc_front_end.json``: recipe, options, backbone layer and normalization, DEM and projector
    configuration). Returns the directory. :func:`load_front_end` restores the attached model."""
    from safetensors.torch import save_file

    inner, family = _inner(model, "save_front_end")
    encoder = getattr(inner, "_hrperc_encoder", None)
    if encoder is None:
        raise ValueError("save_front_end: the model has no hrperc encoder attached; call attach(model, ...) first.")
    if encoder.recipe is None:
        raise ValueError(
            "save_front_end: the attached encoder was not built by hrperc.create_encoder (or encoder_from_model), so "
            "there is no recipe to rebuild it from. Build it with create_encoder(recipe, tower, ...)."
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = inner._hrperc_state
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.state_dict().items()}
    save_file(tensors, str(directory / _FRONT_END_FILE))
    projector = state.projector
    config = {
        "family": family,
        "recipe": encoder.recipe,
        "options": _jsonable(encoder.recipe_options),
        "backbone": {"layer": encoder.layer, "mean": list(encoder.backbone.mean), "std": list(encoder.backbone.std)},
        "dem": _dem_config(encoder.dem),
        "projector": None if projector is None else {"width": encoder.token_width, "out": _text_width(model)},
    }
    (directory / _CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return directory


def _jsonable(options: dict) -> dict:
    out = {}
    for k, v in options.items():
        if k in ("layer", "max_batch", "train_backbone", "grad_checkpointing", "check_range"):
            out[k] = v
            continue
        try:
            json.dumps(v)
        except TypeError as e:
            raise ValueError(
                f"save_front_end: the recipe option {k}={v!r} cannot be written to JSON; build the encoder with "
                f"plain options (ints, strings, lists) to save it."
            ) from e
        out[k] = v
    return out


def load_front_end(model, processor, directory):
    """Rebuild the front end :func:`save_front_end` wrote in ``directory`` around ``model`` (the model loaded
    with ``from_pretrained(directory)``), load its weights and attach it; returns ``(model, processor)``
    as :func:`attach` does.

    Example::

        >>> model = LlavaForConditionalGeneration.from_pretrained(d)                  # doctest: +SKIP
        >>> model, proc = load_front_end(model, AutoProcessor.from_pretrained(d), d)   # doctest: +SKIP
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    fn = "load_front_end"
    if not (directory / _CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{fn}: no {_CONFIG_FILE} in {str(directory)!r}; save the attached model with save_front_end(model, dir) "
            f"(next to model.save_pretrained(dir))."
        )
    config = json.loads((directory / _CONFIG_FILE).read_text())
    inner, family = _inner(model, fn)
    if family != config["family"]:
        raise ValueError(f"{fn}: the front end was saved from a {config['family']!r} model, not {family!r}.")
    bb = config["backbone"]
    backbone = HFBackbone(inner.vision_tower, layer=bb["layer"], mean=bb["mean"], std=bb["std"])
    options = dict(config["options"])
    for key in ("pinpoints",):
        if key in options and options[key] is not None:
            options[key] = [tuple(p) for p in options[key]]
    if config["dem"] is not None:
        dem_kw = dict(config["dem"])
        if dem_kw.get("output_size") is not None:
            dem_kw["output_size"] = tuple(dem_kw["output_size"])
        dim, heads = dem_kw.pop("dim"), dem_kw.pop("heads")
        options["dem"] = DualPerspectiveEnhancement(dim, heads, **dem_kw)
    encoder = create_encoder(config["recipe"], backbone, **options)
    projector = None
    if config["projector"] is not None:
        projector = build_projector("mlp2x_gelu", config["projector"]["width"], config["projector"]["out"])
    model, attached = attach(model, processor, encoder, projector=projector)
    state = inner._hrperc_state
    weights = load_file(str(directory / _FRONT_END_FILE))
    missing, unexpected = state.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{fn}: {_FRONT_END_FILE} does not match the saved configuration: missing {missing}, "
                         f"unexpected {unexpected}.")  # fmt: skip
    ref = next(inner.multi_modal_projector.parameters())
    state.to(device=ref.device, dtype=ref.dtype)
    return model, attached
