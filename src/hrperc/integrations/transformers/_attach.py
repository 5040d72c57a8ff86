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
  change the image by name;
* for a family that takes ``image_grid_thw`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) the encoder's plans must
  be one map of merged patches per image: the attached processor returns that grid as
  ``image_grid_thw`` (the model's M-RoPE reads it), the attached ``get_image_features`` refuses any
  other grid, and returns the model's own output type (Qwen3-VL's ``deepstack_features`` included).

Example::

    >>> import torch
    >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    >>> owns_parameters(torch.nn.Sequential(a, b), a), owns_parameters(b, a)
    (True, False)
"""

from __future__ import annotations

import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..._errors import public
from ...encoder import HighResEncoder
from ...modules.projector import build_projector
from ...ops.idefics import layout_prompt
from ._families import FAMILIES, Family, family_of, recipe_setting, recipes_with
from ._model import (
    ProcessorSettings,
    _plain,
    encoder_strategy,
    hf_blocks,
    inner_model,
    merge_kwargs,
    module_reference,
    projector_of,
    same_setting,
    text_width,
    tower_of,
    variant,
)
from ._pixels import pack_images, read_packed

__all__ = ["attach", "AttachedProcessor", "owns_parameters", "projector_widths", "native_grid"]


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


def native_grid(encoder: HighResEncoder, image_size, merge: int, family: Family) -> list[int]:
    """``[1, gh, gw]``: the ``image_grid_thw`` row of an ``image_size`` image as ``encoder`` plans it -- its token
    map ``(rows, cols)`` times the tower's ``merge``, the patch grid of the resized image, which is what the
    model's M-RoPE reads. An encoder whose tokens are not one map (tiles, newline slots) is refused."""
    layout = encoder.plan(tuple(int(v) for v in image_size)).layout
    if len(layout) != 1 or layout[0].shape is None or layout[0].newline:
        runs = [(seg.source, seg.length, seg.shape) for seg in layout]
        raise ValueError(
            f"the encoder (recipe {encoder.recipe!r}, {type(encoder.front_end).__name__}) lays an image's tokens "
            f"out as {runs}, not one map of merged patches, so the model's image_grid_thw (its M-RoPE positions) "
            f"cannot follow it. Use a native-resolution encoder: encoder_from_model(model, processor) or "
            f"hrperc.create_encoder({family.recipe!r}, model.model.{family.tower})."
        )
    rows, cols = layout[0].shape
    return [1, rows * merge, cols * merge]


def _tower_merge(tower) -> int:
    """The patches a native-resolution tower merges per token side (``spatial_merge_size``)."""
    merge = getattr(tower, "spatial_merge_size", None)
    return int(merge if merge is not None else tower.config.spatial_merge_size)


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
    """What an attached model's image path needs: the encoder, the family, the trainable parts, and (for a
    family that takes ``image_grid_thw``) the tower's merge factor."""

    def __init__(
        self, encoder: HighResEncoder, family: Family, state: _FrontEndState, foreign: bool, merge: int | None = None
    ) -> None:
        self.encoder, self.family, self.state, self.foreign, self.merge = encoder, family, state, foreign, merge


@public
def attach(
    model, processor, encoder: HighResEncoder, *, projector: nn.Module | None = None, foreign_tower: bool = False
):
    """Run ``encoder`` as ``model``'s image path; returns ``(model, AttachedProcessor)`` (``processor=None``:
    ``(model, None)``, for callers who build ``input_ids`` themselves -- each image placeholder repeated
    ``encoder.num_tokens((H, W))`` times -- and ``pixel_values`` with :func:`pack_images`).

    ``model`` is modified in place (and returned): its ``get_image_features`` runs the encoder, whose tokens
    go through the model's projector (none for Qwen: its tower's merger gives the LLM's width) -- or, when
    the encoder's ``token_width`` is not what the model takes there, through ``projector`` or a new
    ``mlp2x_gelu`` one (created, warned about, trainable); newline slots get the model's ``image_newline``;
    Qwen3-VL's deepstack levels come from the encoder's ``EncoderOutput.extras``. The encoder's front end
    (its DEM and any other part it owns) and a new projector are registered under
    ``model.hrperc_front_end`` (so ``.to()``, ``.parameters()`` and optimizers see them) and left out of
    ``model.save_pretrained`` (:func:`save_front_end` saves them). hrperc freezes the tower unless the
    encoder was built with ``train_backbone=True``.

    Refused before anything is changed: an encoder whose backbone is not the model's own vision tower (as
    :func:`encoder_from_model` and ``create_encoder(..., model.model.vision_tower)`` -- Qwen:
    ``model.model.visual`` -- build it) -- the model
    would run another model's vision weights -- unless ``foreign_tower=True`` (you mean another tower; such
    an attachment cannot be saved with :func:`save_front_end`); a ``projector`` whose input is not the
    encoder's ``token_width`` or whose output is not the LLM's hidden size; a model already attached; for
    Qwen, an encoder whose tokens are not one map of merged patches (no ``image_grid_thw`` to give).
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
    tower = tower_of(inner, family)
    own = owns_parameters(tower, encoder.backbone)
    if not own and not foreign_tower:
        raise ValueError(
            f"the encoder's backbone ({type(encoder.backbone).__name__} around "
            f"{type(getattr(encoder.backbone, 'model', encoder.backbone)).__name__}) is not this model's vision tower "
            f"(model.model.{family.tower}: other parameters), so the model would run another tower's weights. Build "
            f"the encoder around this model's tower (encoder_from_model(model, processor)), or pass "
            f"foreign_tower=True if another tower is what you mean."
        )
    merge = _tower_merge(tower) if family.grid_thw else None
    if merge is not None:
        native_grid(encoder, (224, 224), merge, family)  # an encoder whose plans give no grid: refused here
    model_projector = projector_of(inner, family)
    width, out_width = encoder.token_width, text_width(model)
    # Without a projector (Qwen's merger is in the tower) the tokens go into the LLM as they are.
    expected = projector_widths(model_projector)[0] if model_projector is not None else out_width
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
        ref = module_reference(inner, family)
        new_projector.to(device=ref.device, dtype=ref.dtype)
        taker = "the model's projector" if model_projector is not None else "the model's LLM"
        warnings.warn(
            f"attach: the encoder's tokens have width {width} but {taker} takes {expected}; a new "
            f"mlp2x_gelu projector {width} -> {out_width} was created (model.hrperc_front_end.projector). "
            f"Train it (stage 1) before use.",
            stacklevel=2,
        )
    # Everything is checked: from here on nothing fails, so a refused attach leaves the model as it was.
    state = _FrontEndState(encoder.front_end, new_projector)
    model.hrperc_front_end = state  # registered on the model the caller holds: .to(), .parameters(), optimizers
    attachment = _Attachment(encoder, family, state, foreign=not own, merge=merge)
    object.__setattr__(inner, "_hrperc_attachment", attachment)  # plain references: the backbone is the tower
    object.__setattr__(inner, "_hrperc_state", state)
    object.__setattr__(inner, "_hrperc_encoder", encoder)
    encoder.front_end.to(device=encoder.backbone.device)
    ignore = {f"hrperc_front_end.{k}" for k in state.state_dict()}
    model._keys_to_ignore_on_save = set(getattr(model, "_keys_to_ignore_on_save", None) or ()) | ignore
    inner.get_image_features = types.MethodType(_attached_image_features(family), inner)
    attached = None if processor is None else AttachedProcessor(processor, encoder, family.key, merge=merge)
    return model, attached


# --- the model's side ---------------------------------------------------------------------------------------
def _feature_layer_change(encoder: HighResEncoder, layer, strategy, family: Family) -> dict:
    """``vision_feature_layer`` / ``vision_feature_select_strategy`` given to forward / generate -> the encoder
    setting that honours them (``{}``: the encoder's own), or a refusal naming the value and the encoder's."""
    bb = encoder.backbone
    own = encoder_strategy(encoder)
    if strategy is not None and strategy != own:
        kept = "keeps its tower's class token" if own == "full" and bb.num_prefix_tokens else "returns the patch tokens"
        raise ValueError(
            f"vision_feature_select_strategy={strategy!r}, but the attached encoder {kept} "
            f"({own!r}): another strategy would change the image-token count its processor wrote. Drop the "
            f"argument, or pass {own!r} (an encoder of the other strategy: set the config's "
            f"vision_feature_select_strategy before encoder_from_model)."
        )
    if layer is None:
        return {}
    own_layers = list(encoder.layer) if isinstance(encoder.layer, (list, tuple)) else [encoder.layer]
    several = isinstance(layer, (list, tuple))
    entries = list(layer) if several else [layer]
    if several and not family.feature_select:
        raise ValueError(
            f"vision_feature_layer={layer!r}; the attached encoder reads one layer (its own: "
            f"vision_feature_layer={encoder.layer}), never a concatenation of several, as {family.model_class} does. "
            f"Pass one int, or drop the argument."
        )
    if len(entries) != len(own_layers):
        raise ValueError(
            f"vision_feature_layer={layer!r} reads {len(entries)} layer(s), but the attached encoder reads "
            f"{len(own_layers)} (vision_feature_layer={encoder.layer!r}), whose concatenation the projector takes. "
            f"Pass {len(own_layers)} layer(s), or drop the argument."
        )
    n = bb.num_layers
    for entry in entries:
        whole = isinstance(entry, int) and not isinstance(entry, bool)
        if not whole or not -(n + 1) <= entry <= n or hf_blocks(entry, n) == 0:
            raise ValueError(
                f"vision_feature_layer={layer!r}: {entry!r} is not a block output of this {n}-layer tower (the "
                f"attached encoder reads vision_feature_layer={encoder.layer!r}); pass 1..{n} or -{n}..-1, or drop "
                f"the argument."
            )
    blocks = [hf_blocks(entry, n) for entry in entries]
    if len(set(blocks)) != len(blocks):
        raise ValueError(
            f"vision_feature_layer={layer!r} names a block twice; pass each layer once, or drop the argument."
        )
    if blocks == [hf_blocks(entry, n) for entry in own_layers]:
        return {}
    return {"layer": list(layer) if several else layer}


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


def _grid_check(grids: list[list[int]], image_grid_thw) -> None:
    if image_grid_thw is None:
        return
    given = image_grid_thw.tolist() if isinstance(image_grid_thw, torch.Tensor) else [list(g) for g in image_grid_thw]
    if [[int(v) for v in g] for g in given] != grids:
        raise ValueError(
            f"image_grid_thw={given} but the attached encoder plans the packed images as {grids}; the model's "
            f"M-RoPE positions would not be the encoder's grid. Pass the image_grid_thw the attached processor "
            f"returned with these pixel_values."
        )


def _patch_grids(encoder: HighResEncoder, size) -> list[list[int]]:
    """The patch grid of every view of an image of ``size`` (a front end with ``patch_grids``: MiniCPM-V's)."""
    front_end: Any = encoder.front_end
    return front_end.patch_grids(encoder.plan(tuple(int(v) for v in size)))


def _views_check(rows: list[list[int]], given, name: str) -> None:
    if given is None:
        return
    got = given.tolist() if isinstance(given, torch.Tensor) else [list(r) for r in given]
    if [[int(v) for v in r] for r in got] != rows:
        raise ValueError(
            f"{name}={got} but the attached encoder plans the packed images' views as {rows}; the model would place "
            f"them otherwise. Pass the {name} the attached processor returned with these pixel_values."
        )


def _output_class(inner, name: str):
    """``name`` from the model's own modeling module (Qwen3-VL's ``BaseModelOutputWithDeepstackFeatures``), else
    from ``transformers.modeling_outputs``."""
    from transformers import modeling_outputs

    found = getattr(sys.modules.get(type(inner).__module__), name, None)
    return found if found is not None else getattr(modeling_outputs, name)


def _levels(extras: dict, prefix: str, field: str) -> list[str]:
    """The keys ``<prefix>0``, ``<prefix>1``, ... of an encoder's extras, in level order."""
    keys = [k for k in extras if k.startswith(prefix) and k[len(prefix) :].isdigit()]
    keys.sort(key=lambda k: int(k[len(prefix) :]))
    if not keys:
        raise ValueError(
            f"the attached encoder returns no {prefix}<k> extras (it has {sorted(extras)}), but the model feeds "
            f"{field} of every image to its LLM. Use an encoder built around the model's own tower "
            f"(encoder_from_model(model, processor)), whose front end returns them."
        )
    return keys


@public(name="attached get_image_features")
def _run(self, pixel_values, shapes, layer, strategy, family: Family):
    """The attached image path: ``shapes`` is ``image_sizes`` or, for a ``grid_thw`` family, ``image_grid_thw``."""
    attachment = self._hrperc_attachment
    encoder = attachment.encoder
    extra = _feature_layer_change(encoder, layer, strategy, family) if family.feature_layer else {}
    if family.pixels_one_row and isinstance(pixel_values, torch.Tensor) and pixel_values.ndim == 5:
        pixel_values = pixel_values[0]  # MiniCPM-V hands over pixel_values[:1]: every image packed in one row
    packed = read_packed(pixel_values)
    if not family.grid_thw and family.view_sizes is None:
        _image_sizes_check(packed, shapes)
    state = attachment.state
    projector = state.projector
    if projector is None:
        projector = projector_of(self, family)
        if projector is not None and family.projector_map is not None:  # Mistral 3's merges patches: per token
            projector = family.projector_map(projector, encoder)
    project = None
    if projector is not None:
        params = list(projector.parameters())
        dtype = params[0].dtype if params else None

        def project(x):  # the encoder's tokens (its DEM's dtype) into the projector's dtype
            return projector(x if dtype is None else x.to(dtype))

    newline = getattr(self, family.newline, None) if family.newline is not None else None
    groups: dict[str, list[int]] = {}
    for b, p in enumerate(packed):  # images packed with other processor options run that front end
        groups.setdefault(p.options_key, []).append(b)
    runs = {key: variant(encoder, {**packed[indices[0]].options, **extra}, family) for key, indices in groups.items()}
    if family.grid_thw:  # checked before the tower runs: the model's M-RoPE must read the grid the encoder plans
        grids: list = [None] * len(packed)
        for key, indices in groups.items():
            for b in indices:
                grids[b] = native_grid(runs[key], packed[b].image.shape[-2:], attachment.merge, family)
        _grid_check(grids, shapes)
    if family.view_sizes is not None:  # MiniCPM-V's target_sizes: every view's patch grid, as the encoder plans it
        views: list = [None] * len(packed)
        for key, indices in groups.items():
            for b in indices:
                views[b] = _patch_grids(runs[key], packed[b].image.shape[-2:])
        _views_check([row for rows in views for row in rows], shapes, family.view_sizes)
    feats: list = [None] * len(packed)
    levels: dict[str, list] = {field: [None] * len(packed) for field, _ in family.extras}
    for key, indices in groups.items():
        out = runs[key]([packed[b].image for b in indices], project=project, newline=newline)
        for i, b in enumerate(indices):
            n = out.num_tokens[i]
            feats[b] = out.tokens[i, :n]
            if family.image_rows is not None or family.image_markers is not None:  # markers: the model embeds them
                feats[b] = feats[b][~out.slot_mask[i, :n]]
            for field, prefix in family.extras:
                levels[field][b] = [out.extras[k][i, :n] for k in _levels(out.extras, prefix, field)]
    pooled: Any = torch.cat(feats)[None] if family.features == "one_sequence" else feats
    fields = {field: [tuple(level) for level in zip(*per_image)] for field, per_image in levels.items()}
    return _output_class(self, family.features_output)(pooler_output=pooled, **fields)


def _attached_image_features(family: Family):
    """``get_image_features`` with the family's own parameter order (``image_sizes_second``: LLaVA-NeXT /
    OneVision pass ``image_sizes`` second, positionally; ``grid_thw``: Qwen passes ``image_grid_thw`` second)."""

    def sizes_second(
        self, pixel_values, image_sizes=None, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs
    ):
        return _run(self, pixel_values, image_sizes, vision_feature_layer, vision_feature_select_strategy, family)

    def sizes_last(
        self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None, image_sizes=None, **kwargs
    ):
        return _run(self, pixel_values, image_sizes, vision_feature_layer, vision_feature_select_strategy, family)

    def grid_second(self, pixel_values, image_grid_thw=None, **kwargs):
        return _run(self, pixel_values, image_grid_thw, None, None, family)

    def views_second(self, pixel_values, target_sizes=None, downsample_mode=None, **kwargs):
        own = getattr(self._hrperc_attachment.encoder.front_end, "downsample_mode", None)
        if downsample_mode is not None and downsample_mode != own:
            raise ValueError(
                f"attached get_image_features: downsample_mode={downsample_mode!r}, but the attached encoder (and the "
                f"token count its processor wrote) is downsample_mode={own!r}. Drop downsample_mode, or attach an "
                f"encoder built with downsample_mode={downsample_mode!r}."
            )
        return _run(self, pixel_values, target_sizes, None, None, family)

    def mask_second(self, pixel_values, pixel_attention_mask=None, **kwargs):
        if pixel_attention_mask is not None:  # the original processor's: its pixel_values are not the packed images
            raise ValueError(
                "attached get_image_features: pixel_attention_mask was given, but the attached processor's packed "
                "pixel_values need none (each image's own size is in its header). Drop pixel_attention_mask, and "
                "use the processor attach() returned."
            )
        return _run(self, pixel_values, None, None, None, family)

    get_image_features: Callable[..., Any]
    if family.grid_thw:
        get_image_features = grid_second
    elif family.view_sizes is not None:
        get_image_features = views_second
    elif family.pixel_mask_second:
        get_image_features = mask_second
    else:
        get_image_features = sizes_second if family.image_sizes_second else sizes_last
    get_image_features.__name__ = get_image_features.__qualname__ = "get_image_features"
    return get_image_features


# --- the processor's side ------------------------------------------------------------------------------------
_NO_EFFECT = ("disable_grouping", "return_tensors")  # options that never change a pixel or a token
_WHY = {
    "size": "hrperc's encoder sizes the images itself (tiles of the tower's size, or a native pixel budget)",
    "crop_size": "hrperc's encoder feeds the tower tiles of its own size",
    "resample": "hrperc's recipes resize bicubic, as the processor does",
    "image_grid_pinpoints": "the model unpads with its config's image_grid_pinpoints",
}


#: A native-resolution processor's legacy budget options -> the ``size`` entries that hold them.
_BUDGET_KEYS = {"min_pixels": "shortest_edge", "max_pixels": "longest_edge"}


class AttachedProcessor:
    """The processor of an attached model: the original tokenizer and chat template, hrperc's token counts.

    ``processor(images=..., text=..., **kwargs)`` -> ``BatchFeature`` with ``input_ids``,
    ``attention_mask`` (the tokenizer's), ``pixel_values`` (:func:`pack_images`) and ``image_sizes`` --
    for Qwen, ``image_grid_thw`` ``(N, 3)`` instead: ``[1, rows * merge, cols * merge]`` of the encoder's
    token map of each image (``merge``: the tower's, from :func:`attach`; else the processor's
    ``merge_size``) -- and ``mm_token_type_ids`` where the original processor returns them (by its own
    ``create_mm_token_type_ids``). The ``i``-th image placeholder of the text (the original processor's
    ``image_token``) becomes ``num_tokens`` of the ``i``-th image (Qwen: ``<|image_pad|>`` repeated; the
    ``<|vision_start|>`` / ``<|vision_end|>`` the chat template writes around it stay). Other attributes
    (``tokenizer``, ``decode``, ``batch_decode``, ``apply_chat_template`` with ``tokenize=False``, ...)
    are the original processor's.

    ``kwargs``: tokenizer options go to the tokenizer as the original processor sends them. Image-processor
    options (as keywords or in ``images_kwargs=``) are honoured where the original processor would
    change the image with them -- ``do_pad`` (LLaVA's pad to a square), ``image_mean`` / ``image_std``,
    InternVL's ``crop_to_patches`` / ``min_patches`` / ``max_patches``: the encoder runs with that setting
    (the same tower and DEM), the token count follows, and the packed images carry the setting to the
    model. ``device`` moves ``pixel_values``; ``disable_grouping`` and options equal to the processor's own
    settings change nothing (Qwen's legacy ``min_pixels`` / ``max_pixels`` are compared with ``size``'s
    entries). Every other image option is refused by name (``size``, ``crop_size``, ``resample``,
    ``do_resize``, ``min_pixels``, ... differing from the processor's). ``videos`` and ``audio`` are refused.
    """

    def __init__(self, processor, encoder: HighResEncoder, family: str, *, merge: int | None = None) -> None:
        entry = family_of(family)
        if entry is None:
            raise ValueError(f"AttachedProcessor: family={family!r}; pass one of {sorted(FAMILIES)}.")
        self.processor, self.encoder, self.family, self._family = processor, encoder, family, entry
        self.image_token = processor.image_token
        self.settings = ProcessorSettings(processor)
        if entry.grid_thw and merge is None:
            merge = self.settings.get("merge_size")
        if entry.grid_thw and (not isinstance(merge, int) or isinstance(merge, bool) or merge < 1):
            raise ValueError(
                f"AttachedProcessor: merge={merge!r}; a {entry.model_class} processor needs the tower's merge factor "
                f"(an int >= 1) for image_grid_thw. Pass merge=, or use attach(model, processor, encoder), which does."
            )
        self.merge = merge

    def __getattr__(self, name):
        if name in ("processor", "encoder", "family", "_family", "image_token", "settings", "merge"):
            raise AttributeError(name)
        return getattr(self.processor, name)

    def _image_ids(self, use_image_id) -> Callable[[int], str] | None:
        """The number written before the ``k``-th image of a text (``<image_id>k</image_id>``), when the call's
        ``use_image_id`` -- by default the processor's -- is on; ``None`` when it is off."""
        if use_image_id is None:
            use_image_id = getattr(self.processor, "default_use_image_id", self.settings.get("use_image_id", True))
        if not isinstance(use_image_id, bool):
            raise TypeError(f"use_image_id={use_image_id!r}; pass True or False.")
        if not use_image_id or self._family.image_ids is None:
            return None
        start, end = (getattr(self.processor, name) for name in self._family.image_ids)
        return lambda k: f"{start}{k}{end}"

    def _split_kwargs(self, kwargs: dict) -> tuple[dict, dict, bool]:
        """``(tokenizer kwargs, image options the caller set, whether to return mm_token_type_ids)``: the
        original processor's merge of its defaults (InternVL pads on the left, Qwen returns
        ``mm_token_type_ids``) with the caller's; image options are the ones that differ from the
        processor-level defaults."""
        merged = merge_kwargs(self.processor, **kwargs)
        if merged is None:
            return kwargs, {}, False
        text = merged["text_kwargs"]
        types_ids = text.pop("return_mm_token_type_ids", merged.get("return_mm_token_type_ids", False))
        for key in ("return_tensors", "return_text_replacement_offsets"):
            text.pop(key, None)
        base = self.settings.defaults
        given = {k: v for k, v in merged["images_kwargs"].items() if k not in base or not same_setting(v, base[k])}
        given.pop("return_tensors", None)
        return text, given, bool(types_ids)

    def _image_changes(self, given: dict) -> tuple[dict, object]:
        """The caller's image options -> ``(encoder changes, device)``; refuses what cannot be honoured."""
        enc, settings, device = self.encoder, self.settings, None
        changes: dict[str, Any] = {}
        tiles = {k: given.pop(k) for k in ("crop_to_patches", "min_patches", "max_patches") if k in given}
        for key, value in given.items():
            own = settings.get(key)
            size = _plain(settings.get("size"))
            if own is None and key in _BUDGET_KEYS and isinstance(size, dict):  # legacy names of size's entries
                own = size.get(_BUDGET_KEYS[key])
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
            elif key in self._family.call_options:  # the recipe's option of that name (Gemma 3's pan and scan)
                if not same_setting(value, getattr(enc.front_end, key, None)):
                    changes[key] = value
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
        encoder = encoder or self.encoder
        size = tuple(int(v) for v in image_size)
        if self._family.image_rows is not None:  # Pixtral: rows of [IMG] * cols + [IMG_BREAK], the last [IMG_END]
            layout = encoder.plan(size).layout
            if len(layout) != 1 or layout[0].shape is None:
                raise ValueError(
                    f"the encoder (recipe {encoder.recipe!r}) lays an image's tokens out as "
                    f"{[(seg.source, seg.length, seg.shape) for seg in layout]}, not one map of rows; the "
                    f"{self._family.model_class} text needs rows of image tokens. Use "
                    f"encoder_from_model(model, processor)."
                )
            rows, cols = layout[0].shape
            brk, end = (getattr(self.processor, name) for name in self._family.image_rows)
            return ((self.image_token * cols + brk) * rows)[: -len(brk)] + end
        if self._family.tile_markers is not None:  # Idefics3 / SmolVLM: a marked run per tile, then the global image
            fake, glob = (getattr(self.processor, name) for name in self._family.tile_markers)
            layout = encoder.plan(size).layout
            return layout_prompt(layout, image_token=self.image_token, fake_token=fake, global_token=glob)
        if self._family.image_markers is not None:  # MiniCPM-V: the layout's marker runs are the processor's markers
            marks = self._family.image_markers(self.processor)
            runs = encoder.plan(size).layout
            return "".join(marks[r.source] if r.source in marks else self.image_token * r.length for r in runs)
        if self._family.image_text is not None:  # Gemma 3: the processor's text around each view's run
            return self._family.image_text(self.processor, encoder.plan(size).layout)
        n = encoder.num_tokens(size)
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
        ids = self._image_ids(kwargs.pop("use_image_id", None)) if self._family.image_ids is not None else None
        text_kwargs, given, types_ids = self._split_kwargs(kwargs)
        flat = _flat_images(images)
        data = {}
        encoder, image_sizes = self.encoder, []
        if flat:
            changes, device = self._image_changes(dict(given))
            encoder = self.encoder_for(changes)
            pixel_values, sizes = pack_images(flat, changes or None)
            if device is not None:
                pixel_values = pixel_values.to(device)
            data["pixel_values"], image_sizes = pixel_values, sizes.tolist()
            if self._family.pixels_one_row:  # the model reads pixel_values[:1]: one row holding every image
                data["pixel_values"] = pixel_values[None]
            if self._family.grid_thw:  # the grid the encoder plans: the model's M-RoPE positions follow it
                grids = [native_grid(encoder, s, self.merge, self._family) for s in image_sizes]
                data["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
            elif self._family.view_sizes is not None:  # every view's patch grid (MiniCPM-V's target_sizes)
                rows = [r for s in image_sizes for r in _patch_grids(encoder, s)]
                data[self._family.view_sizes] = torch.tensor(rows, dtype=torch.int32)
            elif self._family.image_sizes_input:  # a model whose forward takes no image_sizes gets none
                data["image_sizes"] = sizes
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
            replacements = iter([self.replacement(s, encoder) for s in image_sizes])
            expanded = []
            for t in texts:
                parts = t.split(self.image_token)
                marks = [ids(k) if ids is not None else "" for k in range(len(parts) - 1)]  # MiniCPM-V's image ids
                expanded.append(parts[0] + "".join(m + next(replacements) + p for m, p in zip(marks, parts[1:])))
            data.update(self.processor.tokenizer(expanded, **text_kwargs))
            if types_ids:  # 1 on image tokens: the original processor's own rule (Qwen's M-RoPE reads it)
                types = self.processor.create_mm_token_type_ids(data["input_ids"])
                data[self._family.token_types] = types  # under the processor's name (Gemma 3: token_type_ids)
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
