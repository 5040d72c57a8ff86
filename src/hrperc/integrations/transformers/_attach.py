"""``attach``: an hrperc encoder as a transformers model's image path, and the processor that feeds it.

What :func:`attach` accepts and refuses (``docs/transformers.md``):

* the encoder's backbone must be the model's own vision tower (the same parameters), unless
  ``foreign_tower=True`` says that another tower is meant;
* a new projector must take the encoder's ``token_width`` and give the LLM's hidden size;
* ``vision_feature_layer=`` / ``vision_feature_select_strategy=`` given to the attached model's ``forward``
  or ``generate`` are honoured (another layer: the encoder rebuilt to read it) or refused by name;
* the :class:`AttachedProcessor` honours the image-processor options the original processor would
  (``do_pad``, ``image_mean`` / ``image_std``, InternVL's ``crop_to_patches`` / ``min_patches`` /
  ``max_patches``; the token count and the pixels follow) and refuses every other option that would
  change the image by name.

Example::

    >>> import torch
    >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    >>> owns_parameters(torch.nn.Sequential(a, b), a), owns_parameters(b, a)
    (True, False)
"""

from __future__ import annotations

import types
import warnings
from typing import Any

import torch
from torch import nn

from ..._errors import public
from ...encoder import HighResEncoder
from ...modules.projector import build_projector
from ._families import FAMILIES, Family, family_of, recipe_setting, recipes_with
from ._model import ProcessorSettings, _plain, hf_blocks, inner_model, same_setting, strategy_of, text_width, variant
from ._pixels import pack_images, read_packed

__all__ = ["attach", "AttachedProcessor", "owns_parameters", "projector_widths"]


# --- checks ---------------------------------------------------------------------------------------------
def owns_parameters(tower: nn.Module, part: nn.Module) -> bool:
    """Whether every parameter of ``part`` is one of ``tower``'s (the same object, or the same storage)."""
    own = list(tower.parameters())
    ids = {id(p) for p in own}
    ptrs = {(p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape)) for p in own if not p.is_meta}
    params = list(part.parameters())
    if not params:
        return False
    for p in params:
        if id(p) in ids:
            continue
        if p.is_meta or (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape)) not in ptrs:
            return False
    return True


def projector_widths(projector: nn.Module) -> tuple[int | None, int | None]:
    """``(input width, output width)`` of a projector: its first Linear / LayerNorm and its last Linear;
    ``(None, None)`` when it has neither (``nn.Identity`` keeps the width)."""
    first = last = None
    for module in projector.modules():
        if first is None and isinstance(module, nn.LayerNorm):
            first = int(module.normalized_shape[0])
        if isinstance(module, nn.Linear):
            first = module.in_features if first is None else first
            last = module.out_features
    return first, last


# --- attach ---------------------------------------------------------------------------------------------
class _FrontEndState(nn.Module):
    """What an attachment adds to the model: the encoder's ``front_end`` (its DEM and any other part it
    owns: everything of the encoder but the tower) and a new ``projector`` (``None`` when the model's own
    projector is used). Its ``state_dict`` is what :func:`save_front_end` writes."""

    def __init__(self, front_end: nn.Module, projector) -> None:
        super().__init__()
        self.front_end = front_end
        self.projector = projector
        self._register_load_state_dict_pre_hook(_dem_under_front_end)

    @property
    def dem(self):
        """The front end's DEM (``None`` without one)."""
        return self.front_end.dem


def _dem_under_front_end(state_dict, prefix, *_) -> None:
    """Model state dicts saved before the front end owned its DEM (``hrperc_front_end.dem.*``) still load."""
    for key in [k for k in state_dict if k.startswith(prefix + "dem.")]:
        state_dict[f"{prefix}front_end.{key[len(prefix) :]}"] = state_dict.pop(key)


class _Attachment:
    """What an attached model's image path needs: the encoder, the family, the trainable parts."""

    def __init__(self, encoder: HighResEncoder, family: Family, state: _FrontEndState, foreign: bool) -> None:
        self.encoder, self.family, self.state, self.foreign = encoder, family, state, foreign


@public
def attach(
    model, processor, encoder: HighResEncoder, *, projector: nn.Module | None = None, foreign_tower: bool = False
):
    """Run ``encoder`` as ``model``'s image path; returns ``(model, AttachedProcessor)`` (``processor=None``:
    ``(model, None)``, for callers who build ``input_ids`` themselves -- each image placeholder repeated
    ``encoder.num_tokens((H, W))`` times -- and ``pixel_values`` with :func:`pack_images`).

    ``model`` is modified in place (and returned): its ``get_image_features`` runs the encoder, whose tokens
    go through the model's projector -- or, when the encoder's ``token_width`` is not the projector's
    input width, through ``projector`` or a new ``mlp2x_gelu`` one (created, warned about, trainable);
    newline slots get the model's ``image_newline``. The encoder's front end (its DEM and any other part it
    owns) and a new projector are registered under ``model.hrperc_front_end`` (so ``.to()``, ``.parameters()``
    and optimizers see them) and left out
    of ``model.save_pretrained`` (:func:`save_front_end` saves them). hrperc freezes the tower unless the
    encoder was built with ``train_backbone=True``.

    Refused before anything is changed: an encoder whose backbone is not the model's own vision tower (as
    :func:`encoder_from_model` and ``create_encoder(..., model.model.vision_tower)`` build it) -- the model
    would run another model's vision weights -- unless ``foreign_tower=True`` (you mean another tower; such
    an attachment cannot be saved with :func:`save_front_end`); a ``projector`` whose input is not the
    encoder's ``token_width`` or whose output is not the LLM's hidden size; a model already attached.
    """
    inner, family = inner_model(model)
    if not isinstance(encoder, HighResEncoder):
        raise TypeError(
            f"encoder is a {type(encoder).__name__}; pass a HighResEncoder, e.g. "
            f"encoder_from_model(model, processor) or hrperc.create_encoder('inf_llava', model.model.vision_tower)."
        )
    if not isinstance(foreign_tower, bool):
        raise TypeError(f"foreign_tower={foreign_tower!r}; pass True or False.")
    if projector is not None and not isinstance(projector, nn.Module):
        raise TypeError(f"projector is a {type(projector).__name__}; pass an nn.Module (or None).")
    if getattr(inner, "_hrperc_attachment", None) is not None:
        raise ValueError("this model already has an hrperc encoder attached; attach to a fresh model.")
    own = owns_parameters(inner.vision_tower, encoder.backbone)
    if not own and not foreign_tower:
        raise ValueError(
            f"the encoder's backbone ({type(encoder.backbone).__name__} around "
            f"{type(getattr(encoder.backbone, 'model', encoder.backbone)).__name__}) is not this model's vision tower "
            f"(model.model.vision_tower: other parameters), so the model would run another tower's weights. Build the "
            f"encoder around this model's tower (encoder_from_model(model, processor)), or pass foreign_tower=True "
            f"if another tower is what you mean."
        )
    model_projector = inner.multi_modal_projector
    expected, width, out_width = projector_widths(model_projector)[0], encoder.token_width, text_width(model)
    new_projector = None
    if projector is not None:
        p_in, p_out = projector_widths(projector)
        p_in = width if p_in is None and p_out is None else p_in
        p_out = p_in if p_out is None else p_out
        for name, got, need in (("input", p_in, width), ("output", p_out, out_width)):
            if got is not None and got != need:
                raise ValueError(
                    f"projector has {name} width {got} but needs {need} (the encoder's token_width {width} -> "
                    f"the LLM's hidden size {out_width}). Pass a projector of {width} -> {out_width}, e.g. "
                    f"build_projector('mlp2x_gelu', {width}, {out_width})."
                )
        new_projector = projector
    elif expected is not None and expected != width:
        new_projector = build_projector("mlp2x_gelu", width, out_width)
        new_projector.to(
            device=next(model_projector.parameters()).device, dtype=next(model_projector.parameters()).dtype
        )
        warnings.warn(
            f"attach: the encoder's tokens have width {width} but the model's projector takes {expected}; a new "
            f"mlp2x_gelu projector {width} -> {out_width} was created (model.hrperc_front_end.projector). "
            f"Train it (stage 1) before use.",
            stacklevel=2,
        )
    # Everything is checked: from here on nothing fails, so a refused attach leaves the model as it was.
    state = _FrontEndState(encoder.front_end, new_projector)
    model.hrperc_front_end = state  # registered on the model the caller holds: .to(), .parameters(), optimizers
    attachment = _Attachment(encoder, family, state, foreign=not own)
    object.__setattr__(inner, "_hrperc_attachment", attachment)  # plain references: the backbone is the tower
    object.__setattr__(inner, "_hrperc_state", state)
    object.__setattr__(inner, "_hrperc_encoder", encoder)
    encoder.front_end.to(device=encoder.backbone.device)
    ignore = {f"hrperc_front_end.{k}" for k in state.state_dict()}
    model._keys_to_ignore_on_save = set(getattr(model, "_keys_to_ignore_on_save", None) or ()) | ignore
    inner.get_image_features = types.MethodType(_attached_image_features(family), inner)
    return model, (None if processor is None else AttachedProcessor(processor, encoder, family.model_type))


# --- the model's side ---------------------------------------------------------------------------------------
def _feature_layer_change(encoder: HighResEncoder, layer, strategy) -> dict:
    """``vision_feature_layer`` / ``vision_feature_select_strategy`` given to forward / generate -> the encoder
    setting that honours them (``{}``: the encoder's own), or a refusal naming the value and the encoder's."""
    bb = encoder.backbone
    own = strategy_of(bb)
    if strategy is not None and strategy != own:
        raise ValueError(
            f"vision_feature_select_strategy={strategy!r}, but the attached encoder returns the patch tokens "
            f"of its tower ({bb.num_prefix_tokens} prefix token(s) dropped), which is "
            f"vision_feature_select_strategy={own!r}; hrperc does not keep a CLS token or drop a patch token. Drop "
            f"the argument, or pass {own!r}."
        )
    if layer is None:
        return {}
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ValueError(
            f"vision_feature_layer={layer!r}; the attached encoder reads one layer (its own: "
            f"vision_feature_layer={encoder.layer}), never a concatenation of several. Pass one int, or drop the "
            f"argument."
        )
    n = bb.num_layers
    if not -(n + 1) <= layer <= n or hf_blocks(layer, n) == 0:
        raise ValueError(
            f"vision_feature_layer={layer} is not a block output of this {n}-layer tower (the attached encoder "
            f"reads vision_feature_layer={encoder.layer}); pass 1..{n} or -{n}..-1, or drop the argument."
        )
    if hf_blocks(layer, n) == hf_blocks(encoder.layer, n):
        return {}
    return {"layer": layer}


def _image_sizes_check(packed, image_sizes) -> None:
    if image_sizes is None:
        return
    sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else [list(s) for s in image_sizes]
    header = [list(p.image.shape[-2:]) for p in packed]
    if [[int(v) for v in s] for s in sizes] != header:
        raise ValueError(
            f"image_sizes={sizes} but the packed pixel_values' headers hold images of {header}; they must "
            f"agree. Pass the image_sizes the attached processor (or pack_images) returned with these pixel_values."
        )


@public(name="attached get_image_features")
def _run(self, pixel_values, image_sizes, layer, strategy, family: Family):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    attachment = self._hrperc_attachment
    encoder = attachment.encoder
    extra = _feature_layer_change(encoder, layer, strategy)
    packed = read_packed(pixel_values)
    _image_sizes_check(packed, image_sizes)
    state = attachment.state
    projector = state.projector if state.projector is not None else self.multi_modal_projector
    dtype = next(projector.parameters()).dtype if any(True for _ in projector.parameters()) else None

    def project(x):  # the encoder's tokens (its DEM's dtype) into the projector's dtype
        return projector(x if dtype is None else x.to(dtype))

    newline = getattr(self, family.newline, None) if family.newline is not None else None
    groups: dict[str, list[int]] = {}
    for b, p in enumerate(packed):  # images packed with other processor options run that front end
        groups.setdefault(p.options_key, []).append(b)
    feats: list = [None] * len(packed)
    for indices in groups.values():
        run = variant(encoder, {**packed[indices[0]].options, **extra}, family)
        out = run([packed[b].image for b in indices], project=project, newline=newline)
        for i, b in enumerate(indices):
            feats[b] = out.tokens[i, : out.num_tokens[i]]
    pooled: Any = torch.cat(feats)[None] if family.features == "one_sequence" else feats
    return BaseModelOutputWithPooling(pooler_output=pooled)


def _attached_image_features(family: Family):
    """``get_image_features`` with the family's own parameter order (``image_sizes_second``: LLaVA-NeXT /
    OneVision pass ``image_sizes`` second, positionally)."""

    def sizes_second(
        self, pixel_values, image_sizes=None, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs
    ):
        return _run(self, pixel_values, image_sizes, vision_feature_layer, vision_feature_select_strategy, family)

    def sizes_last(
        self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None, image_sizes=None, **kwargs
    ):
        return _run(self, pixel_values, image_sizes, vision_feature_layer, vision_feature_select_strategy, family)

    get_image_features = sizes_second if family.image_sizes_second else sizes_last
    get_image_features.__name__ = get_image_features.__qualname__ = "get_image_features"
    return get_image_features


# --- the processor's side ------------------------------------------------------------------------------------
_NO_EFFECT = ("disable_grouping", "return_tensors")  # options that never change a pixel or a token
_WHY = {
    "size": "hrperc's encoder feeds the tower tiles of its own size",
    "crop_size": "hrperc's encoder feeds the tower tiles of its own size",
    "resample": "hrperc's recipes resize bicubic, as the processor does",
    "image_grid_pinpoints": "the model unpads with its config's image_grid_pinpoints",
}


class AttachedProcessor:
    """The processor of an attached model: the original tokenizer and chat template, hrperc's token counts.

    ``processor(images=..., text=..., **kwargs)`` -> ``BatchFeature`` with ``input_ids``,
    ``attention_mask`` (the tokenizer's), ``pixel_values`` (:func:`pack_images`) and ``image_sizes``. The
    ``i``-th image placeholder of the text (the original processor's ``image_token``) becomes
    ``num_tokens`` of the ``i``-th image. Other attributes (``tokenizer``, ``decode``, ``batch_decode``,
    ``apply_chat_template`` with ``tokenize=False``, ...) are the original processor's.

    ``kwargs``: tokenizer options go to the tokenizer as the original processor sends them. Image-processor
    options (as keywords or in ``images_kwargs=``) are honoured where the original processor would
    change the image with them -- ``do_pad`` (LLaVA's pad to a square), ``image_mean`` / ``image_std``,
    InternVL's ``crop_to_patches`` / ``min_patches`` / ``max_patches``: the encoder runs with that setting
    (the same tower and DEM), the token count follows, and the packed images carry the setting to the
    model. ``device`` moves ``pixel_values``; ``disable_grouping`` and options equal to the processor's own
    settings change nothing. Every other image option is refused by name (``size``, ``crop_size``,
    ``resample``, ``do_resize``, ... differing from the processor's). ``videos`` and ``audio`` are refused.
    """

    def __init__(self, processor, encoder: HighResEncoder, family: str) -> None:
        entry = family_of(family)
        if entry is None:
            raise ValueError(f"AttachedProcessor: family={family!r}; pass one of {sorted(FAMILIES)}.")
        self.processor, self.encoder, self.family, self._family = processor, encoder, family, entry
        self.image_token = processor.image_token
        self.settings = ProcessorSettings(processor)

    def __getattr__(self, name):
        if name in ("processor", "encoder", "family", "_family", "image_token", "settings"):
            raise AttributeError(name)
        return getattr(self.processor, name)

    def _split_kwargs(self, kwargs: dict) -> tuple[dict, dict]:
        """``(tokenizer kwargs, image options the caller set)``: the original processor's merge of its
        defaults (InternVL pads on the left) with the caller's; image options are the ones that differ from
        the processor-level defaults."""
        merge = getattr(self.processor, "_merge_kwargs", None)
        if merge is None:
            return kwargs, {}
        init = getattr(self.processor.tokenizer, "init_kwargs", {})
        merged = merge(tokenizer_init_kwargs=init, **kwargs)
        text = merged["text_kwargs"]
        for key in ("return_tensors", "return_mm_token_type_ids", "return_text_replacement_offsets"):
            text.pop(key, None)
        base = self.settings.defaults
        given = {k: v for k, v in merged["images_kwargs"].items() if k not in base or not same_setting(v, base[k])}
        given.pop("return_tensors", None)
        return text, given

    def _image_changes(self, given: dict) -> tuple[dict, object]:
        """The caller's image options -> ``(encoder changes, device)``; refuses what cannot be honoured."""
        enc, settings, device = self.encoder, self.settings, None
        changes: dict[str, Any] = {}
        tiles = {k: given.pop(k) for k in ("crop_to_patches", "min_patches", "max_patches") if k in given}
        for key, value in given.items():
            own = settings.get(key)
            if key == "device":
                device = value
            elif key in _NO_EFFECT:
                continue
            elif key == "do_pad":
                if not isinstance(value, bool):
                    raise TypeError(f"do_pad={value!r}; pass True or False.")
                if not self._family.square_pad or not settings.squares:
                    continue  # pads a batch to one size (CLIP's, LLaVA-NeXT's patches): no image changes
                if enc.recipe in recipes_with("pad"):
                    if value != recipe_setting(enc, "pad"):
                        changes["pad"] = value
                elif value != bool(own):
                    raise ValueError(
                        f"do_pad={value!r}: the attached encoder (recipe {enc.recipe!r}) has no pad-to-square "
                        f"setting to honour it with ({' and '.join(recipes_with('pad'))} have). Drop do_pad."
                    )
            elif key in ("image_mean", "image_std"):
                name = "mean" if key == "image_mean" else "std"
                target = _triple(value)
                if target is None:
                    raise ValueError(f"{key}={value!r}; pass three floats (R, G, B) or one float.")
                if target != tuple(getattr(enc.backbone, name)):
                    changes[name] = list(target)
            elif key == "image_grid_pinpoints" and self._model_pinpoints() is not None:
                if [tuple(p) for p in value] != self._model_pinpoints():
                    raise ValueError(
                        f"image_grid_pinpoints={value!r} differ from the model's {self._model_pinpoints()}: "
                        f"{_WHY[key]}, so even the original model would mis-read such images. Drop "
                        f"image_grid_pinpoints."
                    )
            elif not same_setting(value, own):
                why = _WHY.get(key, "hrperc's front end does not reproduce this setting")
                raise ValueError(
                    f"the image option {key}={_plain(value)!r} differs from the processor's {key}="
                    f"{_plain(own)!r}; {why}, so the model would not see what the original processor makes. Drop "
                    f"{key}."
                )
        if tiles:
            changes.update(self._tile_changes(tiles))
        return changes, device

    def _tile_changes(self, tiles: dict) -> dict:
        """InternVL's ``crop_to_patches`` / ``min_patches`` / ``max_patches`` -> ``min_tiles`` / ``max_tiles``."""
        get = self.settings.get
        crop = tiles.get("crop_to_patches", get("crop_to_patches", True))
        lo, hi = tiles.get("min_patches", get("min_patches", 1)), tiles.get("max_patches", get("max_patches", 12))
        for name, value in (("min_patches", lo), ("max_patches", hi)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}; pass an int >= 1.")
        if not isinstance(crop, bool):
            raise TypeError(f"crop_to_patches={crop!r}; pass True or False.")
        target = (lo, hi) if crop else (1, 1)
        if self.encoder.recipe in recipes_with("min_tiles"):
            current = (recipe_setting(self.encoder, "min_tiles"), recipe_setting(self.encoder, "max_tiles"))
            return {} if target == current else {"min_tiles": target[0], "max_tiles": target[1]}
        own_crop = get("crop_to_patches", True)
        own = (get("min_patches", 1), get("max_patches", 12)) if own_crop else (1, 1)
        if target != own:
            names = ", ".join(f"{k}={v!r}" for k, v in tiles.items())
            raise ValueError(
                f"{names}: the attached encoder (recipe {self.encoder.recipe!r}) has no InternVL tiling to "
                f"honour them with (the {' and '.join(recipes_with('min_tiles'))} recipe has). Drop them."
            )
        return {}

    def _model_pinpoints(self):
        points = self.settings.get("image_grid_pinpoints")
        return None if points is None else [tuple(p) for p in points]

    @public(name="AttachedProcessor")
    def encoder_for(self, changes: dict | None = None) -> HighResEncoder:
        """The encoder that runs images processed with ``changes`` (``{}``: the attached encoder)."""
        return variant(self.encoder, changes or {}, self._family)

    def replacement(self, image_size, encoder: HighResEncoder | None = None) -> str:
        """The text that stands for one image of ``(H, W)`` pixels."""
        n = (encoder or self.encoder).num_tokens(tuple(int(v) for v in image_size))
        if self._family.image_brackets is not None:
            start, end = (getattr(self.processor, name) for name in self._family.image_brackets)
            return f"{start}{self.image_token * n}{end}"
        return self.image_token * n

    @public(name="AttachedProcessor")
    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        from transformers.feature_extraction_utils import BatchFeature

        for name, value in (("videos", videos), ("audio", audio)):
            if value is not None:
                raise ValueError(
                    f"{name}= was given; an attached model's hrperc image path takes images only. Drop {name}=, "
                    f"or use the original processor and model for it."
                )
        return_tensors = kwargs.pop("return_tensors", None)
        text_kwargs, given = self._split_kwargs(kwargs)
        flat = _flat_images(images)
        data = {}
        encoder = self.encoder
        if flat:
            changes, device = self._image_changes(dict(given))
            encoder = self.encoder_for(changes)
            pixel_values, sizes = pack_images(flat, changes or None)
            if device is not None:
                pixel_values = pixel_values.to(device)
            data.update(pixel_values=pixel_values, image_sizes=sizes)
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            found = sum(t.count(self.image_token) for t in texts)
            if found != len(flat):
                raise ValueError(
                    f"the text holds {found} image placeholder(s) {self.image_token!r} but {len(flat)} image(s) "
                    f"were given; pass one placeholder per image, in order."
                )
            why = self._family.several_images
            if why is not None and any(t.count(self.image_token) > 1 for t in texts):
                raise ValueError(f"a text holds several images; {why}. Pass one image per text.")
            sizes = data["image_sizes"].tolist() if flat else []
            replacements = iter([self.replacement(s, encoder) for s in sizes])
            expanded = []
            for t in texts:
                parts = t.split(self.image_token)
                expanded.append(parts[0] + "".join(next(replacements) + p for p in parts[1:]))
            data.update(self.processor.tokenizer(expanded, **text_kwargs))
        return BatchFeature(data, tensor_type=return_tensors)


def _triple(value) -> tuple[float, float, float] | None:
    plain = _plain(value)
    values = list(plain) if isinstance(plain, tuple) else [plain] * 3
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return out if len(out) == 3 else None


def _flat_images(images) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [img for item in images for img in _flat_images(item)] if images else []
    return [images]
