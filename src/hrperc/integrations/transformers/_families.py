"""The transformers model families hrperc integrates: one :class:`Family` entry each, in :data:`TABLE`.

Everything the integration decides by family is read from the entry of the model's ``model_type`` -- the
recipe that reproduces its image path, how its config and processor give that recipe's options, which
processor steps and options it has, the text that stands for one image, how the features go back to the
model -- so no other module of the integration names a family. Adding a family is one entry here plus
the recipe it names (a file under ``hrperc/recipes``); ``docs/transformers.md`` walks through it.

:data:`RECIPE_SETTINGS` is the same for the recipe settings an image-processor option rebuilds an
attached encoder with (``pad``, ``min_tiles``, ``max_tiles``): which recipes have them, and their defaults.

Two kinds of families share the machinery: the tiling ones (LLaVA-1.5, LLaVA-NeXT, OneVision, InternVL:
a fixed-size ViT, its ``vision_feature_layer``, a ``multi_modal_projector``) and the native-resolution
ones (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: the tower ``visual`` reads each image at its own budgeted size and
merges patches itself; the model takes ``image_grid_thw`` and ``mm_token_type_ids`` for its M-RoPE).
What tells them apart is fields of the entry (``tower``, ``projector``, ``backbone``, ``tiles``,
``feature_layer``, ``grid_thw``, ``extras``, ``features_output``), never the family's name.

Example::

    >>> family_of("internvl").recipe, family_of("internvl").features
    ('internvl', 'one_sequence')
    >>> [f.model_type for f in TABLE if f.square_pad]
    ['llava']
    >>> [(f.model_type, f.tower, f.projector) for f in TABLE if f.grid_thw][:1]
    [('qwen2_vl', 'visual', None)]
    >>> hf_blocks(-2, 24), hf_blocks(23, 24), hf_blocks(-1, 27)   # transformers' hidden_states index -> blocks run
    (23, 23, 27)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from torch import nn

from ...backbones.hf_vit import HFBackbone
from ...backbones.idefics import IdeficsBackbone
from ...backbones.pixtral import PixtralBackbone
from ...backbones.qwen_vl import QwenBackbone
from ...recipes.gemma3 import Gemma3Projector, Gemma3Tower, image_text
from ...recipes.minicpm_v import MergerProjector, MiniCPMVBackbone

__all__ = ["Family", "TABLE", "FAMILIES", "family_of", "RECIPE_SETTINGS", "recipes_with", "recipe_setting", "hf_blocks"]

# A reader: (model config, ProcessorSettings or None) -> recipe options read from them.
Reader = Callable[[object, object], dict]
# A tower check: (vision tower, vision_feature_layer, number of layers, what) -> None, or a ValueError.
TowerCheck = Callable[[nn.Module, int, int, str], None]


@dataclass(frozen=True)
class Family:
    """What the integration needs to know of one transformers model family.

    ``model_type``: the config's ``model_type``; ``recipe``: the hrperc recipe that reproduces its image
    path; ``model_class``: its ``*ForConditionalGeneration`` class (for messages); ``options``: readers,
    in order, of the recipe's options from the model config and the processor settings (``None``
    without a processor); ``tower_checks``: refusals of towers (or layers) the recipe does not reproduce,
    run at ``encoder_from_model`` and for every ``vision_feature_layer`` a forward asks for.

    Processor: ``square_pad`` -- its image processor's ``do_pad`` may pad each image to a square (LLaVA's),
    read into the recipe's ``pad`` and honoured at the attached processor's call; without padding it
    centre-crops, so ``do_center_crop`` must stay on. ``crop_size_with_center_crop`` -- ``crop_size`` is
    used only with ``do_center_crop`` (not checked against the tile when that is off).

    Text and features: ``image_brackets`` -- the processor's attributes holding the tokens written around
    each image's placeholders (InternVL's ``<img>`` / ``</img>``), ``None`` for none; ``several_images`` --
    why a text with several images is refused (``None``: accepted); ``image_sizes_second`` -- its
    ``get_image_features`` takes ``image_sizes`` as the second positional argument; ``features`` --
    ``"per_image"`` (a list of ``(n_i, D)``) or ``"one_sequence"`` (all images' tokens concatenated,
    ``(1, sum n_i, D)``); ``newline`` -- the inner model's attribute holding the newline embedding the
    encoder's newline slots get (``None``: no newline slots).

    The model's parts: ``tower`` -- the inner model's attribute holding the vision tower (``"visual"`` for
    Qwen); ``projector`` -- the one holding the projector into the LLM (``None``: the tower's own merger
    gives the LLM's width, as Qwen's does); ``backbone`` -- the hrperc backbone class around the tower,
    built as ``backbone(tower, layer=, mean=, std=)``.

    Native resolution: ``tiles`` -- the processor resizes to tiles of the tower's size (its ``size`` /
    ``crop_size`` are checked against it); ``False``: the recipe sizes each image itself (a pixel budget,
    read by an ``options`` reader). ``feature_layer`` -- the config's ``vision_feature_layer`` /
    ``vision_feature_select_strategy`` pick the tower's layer and tokens, and ``forward`` / ``generate``
    take them; ``False``: the tower's last block through its merger, no such arguments. ``feature_select`` --
    its ``get_image_features`` is LLaVA's: a list ``vision_feature_layer`` concatenates those layers on the
    channels and ``"full"`` keeps a CLS token, which its recipe takes as ``layer=[...]`` and
    ``select_strategy`` (``False``: one int layer, and the strategy that gives the patch tokens). ``grid_thw`` --
    the model takes ``image_grid_thw`` ``(N, 3)`` (``[1, h / patch, w / patch]`` of each resized image)
    second in ``get_image_features`` and for its M-RoPE, with ``mm_token_type_ids``: the attached
    processor returns the grid the encoder planned in place of ``image_sizes``. ``extras`` -- ``(field,
    prefix)`` pairs: ``get_image_features`` also returns ``field``, one tuple of per-image tensors per
    level, from the encoder's ``EncoderOutput.extras["<prefix><k>"]`` (Qwen3-VL's ``deepstack_features``).
    ``features_output`` -- the class ``get_image_features`` returns, looked up in the model's own
    modeling module (then in ``transformers.modeling_outputs``).

    Pixtral (Pixtral-12B in LLaVA, Mistral 3): ``vision_type`` -- the ``vision_config.model_type`` this
    entry is for (``None``: any); an entry with one is looked up before the plain ``model_type``'s, so a
    LLaVA with a Pixtral tower is not LLaVA-1.5. ``select_strategy`` -- the config has
    ``vision_feature_select_strategy`` (Mistral 3's has none). ``image_rows`` -- the processor's
    attributes holding the tokens that end each row of an image's token map and the last row
    (``[IMG_BREAK]`` / ``[IMG_END]``): the text per image is rows of ``image_token * cols`` each followed
    by the first, the last by the second, and the model embeds those itself, so ``get_image_features``
    returns only the features of the encoder's non-slot tokens. ``projector_map`` -- wraps the model's
    projector into a per-token map of the encoder's tokens (Mistral 3's merges patches in it:
    :class:`~hrperc.recipes.pixtral.MergedProjector`); ``None``: the projector is one already.

    Idefics3 / SmolVLM: ``tile_markers`` -- the processor's attributes holding the token written around
    each view (``<fake_token_around_image>``) and the global image's tag (``<global-img>``): the text per
    image is :func:`hrperc.ops.idefics.layout_prompt` of the encoder's layout (a ``<row_r_col_c>`` run per
    tile, then the global image); ``pixel_mask_second`` -- ``get_image_features(pixel_values,
    pixel_attention_mask=None, ...)``, the mask second, positionally; ``image_sizes_input`` -- the model's
    ``forward`` takes ``image_sizes`` (``False``: the attached processor returns none); ``resample_read`` --
    the processor's ``resample`` is read into the recipe (LANCZOS) by an ``options`` reader, not refused for
    not being bicubic.

    MiniCPM-V: ``image_markers`` -- ``processor -> {layout source: text}``: the text of the encoder's one-token
    marker runs (``<image>``, ``</image>``, ``<slice>``, ``</slice>``, ``"\n"``); the text per image is its
    layout with each marker run written as its text and every other run as image tokens, and
    ``get_image_features`` returns only the features of the non-slot tokens. ``image_ids`` -- the processor's
    attributes holding the tokens around each image's number in its text (``<image_id>k</image_id>``, written
    before the image when the processor's ``use_image_id`` -- a call option too -- is on). ``view_sizes`` --
    the name under which the model takes the patch grid of every view, ``(views, 2)`` (``"target_sizes"``,
    second in ``get_image_features``): the attached processor returns the front end's ``patch_grids`` of each
    plan in place of ``image_sizes``. ``pixels_one_row`` -- the model hands only ``pixel_values[:1]`` to
    ``get_image_features`` (MiniCPM-V packs every image in one row): the attached processor returns the packed
    images under one leading row, ``(1, B, 3, H, W)``.

    Gemma 3: ``image_text`` -- ``(processor, layout) -> str``, the text that stands for one image, written from
    the encoder's token layout (one run per view: the whole image, then its pan-and-scan crops; Gemma 3's
    ``<start_of_image>`` ... ``<end_of_image>`` around each and the processor's sentence around the crops);
    ``token_types`` -- the name under which the processor returns its image-token types (Gemma 3's
    ``token_type_ids``, which its LLM reads for the bidirectional attention over each image); ``call_options``
    -- image-processor options that are recipe options of the same name (the pan-and-scan ones), honoured at
    the attached processor's call: the encoder is rebuilt with them.
    """

    model_type: str
    recipe: str
    model_class: str
    options: tuple[Reader, ...] = ()
    tower_checks: tuple[TowerCheck, ...] = ()
    square_pad: bool = False
    crop_size_with_center_crop: bool = False
    image_brackets: tuple[str, str] | None = None
    several_images: str | None = None
    image_sizes_second: bool = False
    features: str = "per_image"
    newline: str | None = None
    tower: str = "vision_tower"
    projector: str | None = "multi_modal_projector"
    backbone: type[Any] = HFBackbone
    tiles: bool = True
    feature_layer: bool = True
    feature_select: bool = False
    grid_thw: bool = False
    extras: tuple[tuple[str, str], ...] = ()
    features_output: str = "BaseModelOutputWithPooling"
    vision_type: str | None = None
    select_strategy: bool = True
    image_rows: tuple[str, str] | None = None
    projector_map: Callable[[nn.Module, Any], nn.Module] | None = None
    tile_markers: tuple[str, str] | None = None
    pixel_mask_second: bool = False
    image_sizes_input: bool = True
    resample_read: bool = False
    image_text: Callable[[Any, tuple], str] | None = None
    token_types: str = "mm_token_type_ids"
    call_options: tuple[str, ...] = ()
    image_markers: Callable[[Any], dict[str, str]] | None = None
    image_ids: tuple[str, str] | None = None
    view_sizes: str | None = None
    pixels_one_row: bool = False

    @property
    def key(self) -> str:
        """The entry's name: ``model_type``, with ``_<vision_type>`` when the entry is for one tower type."""
        return self.model_type if self.vision_type is None else f"{self.model_type}_{self.vision_type}"

    def __post_init__(self) -> None:
        if self.features not in ("per_image", "one_sequence"):
            raise ValueError(
                f"Family: features={self.features!r} for {self.model_type!r}; use 'per_image' or 'one_sequence'."
            )
        if self.grid_thw and (self.image_sizes_second or self.feature_layer):
            raise ValueError(
                f"Family: {self.model_type!r} takes image_grid_thw second in get_image_features, which leaves no "
                f"place for image_sizes_second or feature_layer; set them False."
            )

    def recipe_options(self, config, settings) -> dict:
        """The recipe's options read from ``config`` and ``settings`` (in the readers' order)."""
        kw: dict = {}
        for read in self.options:
            kw.update(read(config, settings))
        return kw

    def check_tower(self, tower: nn.Module, layer: int, num_layers: int, what: str) -> None:
        for check in self.tower_checks:
            check(tower, layer, num_layers, what)


def hf_blocks(layer: int, num_layers: int) -> int:
    """transformers' ``hidden_states[layer]`` (``0``: the embeddings) -> the number of blocks it comes after."""
    return layer if layer >= 0 else num_layers + 1 + layer


# --- readers: config and processor -> recipe options ----------------------------------------------------------
def _square_pad(config, settings) -> dict:
    # Only LLaVA's image processor pads to a square; CLIP's do_pad pads a batch to one size (a no-op after
    # its centre crop), so a CLIPImageProcessor is the resize-shortest-edge + centre-crop path.
    return {"pad": bool(settings.get("do_pad", False)) and settings.squares if settings is not None else False}


def _pinpoints(config, settings) -> dict:
    pinpoints = [tuple(p) for p in config.image_grid_pinpoints]
    ip_points = settings.get("image_grid_pinpoints") if settings is not None else None
    if ip_points is not None and [tuple(p) for p in ip_points] != pinpoints:
        raise ValueError(
            f"the processor's image_grid_pinpoints {ip_points} differ from the model's {pinpoints}; the "
            f"model's own code would then unpad with other grids. Use the processor saved with the model."
        )
    return {"pinpoints": pinpoints}


def _anyres_max(config, settings) -> dict:
    return {"max_tiles": int(str(getattr(config, "vision_aspect_ratio", "anyres_max_9")).replace("anyres_max_", ""))}


def _pixel_shuffle(config, settings) -> dict:
    return {"downsample": round(1 / config.downsample_ratio)}


def _processor_tiles(config, settings) -> dict:
    get = settings.get if settings is not None else (lambda name, default=None: default)
    crop = get("crop_to_patches", True)
    return {
        "max_tiles": int(get("max_patches", 12)) if crop else 1,
        "min_tiles": int(get("min_patches", 1)) if crop else 1,
    }


def _setting(value, key: str):
    """``value[key]`` of a processor size setting (a dict or transformers' ``SizeDict``); ``None`` when unset."""
    return value.get(key) if isinstance(value, dict) else getattr(value, key, None)


def _longest_edge(settings, family: str, does: str, example) -> int:
    """The processor's ``size["longest_edge"]``; a size without it is refused, naming what ``family``'s processor
    ``does`` with that side and a size to build it with (``example``)."""
    edge = _setting(settings.get("size"), "longest_edge")
    if edge is None:
        raise ValueError(
            f"the processor's size={settings.get('size')!r} lacks 'longest_edge', the side {family} processor "
            f"{does}. Use the processor saved with the model, or one built with size={{'longest_edge': {example}}}."
        )
    return int(edge)


#: A native-resolution processor's setting -> the tower config's attribute it must equal.
_NATIVE_GEOMETRY = (
    ("patch_size", "patch_size"),
    ("merge_size", "spatial_merge_size"),
    ("temporal_patch_size", "temporal_patch_size"),
)


def _pixel_budget(config, settings) -> dict:
    """``min_pixels`` / ``max_pixels`` from the processor's ``size["shortest_edge"]`` / ``size["longest_edge"]``
    (the recipe's defaults, the released checkpoints' budget, without a processor); a processor that cuts
    images into other patches than the model's tower is refused."""
    if settings is None:
        return {}
    vision = config.vision_config
    for name, attr in _NATIVE_GEOMETRY:
        got, need = settings.get(name), getattr(vision, attr)
        if got is not None and got != need:
            raise ValueError(
                f"the processor's {name}={got!r} differs from the model's vision tower ({attr}={need}): the "
                f"processor would cut images into other patches (and count other tokens) than the tower reads. "
                f"Use the processor saved with the model, or one with {name}={need}."
            )
    size = settings.get("size")
    budget = {"min_pixels": _setting(size, "shortest_edge"), "max_pixels": _setting(size, "longest_edge")}
    if size is None or any(v is None for v in budget.values()):
        raise ValueError(
            f"the processor's size={size!r} lacks 'shortest_edge' (min_pixels) or 'longest_edge' (max_pixels), "
            f"the pixel budget of a native-resolution processor. Use the processor saved with the model, or "
            f"one built with size={{'shortest_edge': ..., 'longest_edge': ...}}."
        )
    return {k: int(v) for k, v in budget.items()}


def _pixtral_geometry(config, settings) -> dict:
    """Pixtral's ``merge_size`` (the model config's ``spatial_merge_size``; 1 for LLaVA, whose projector merges
    nothing) and, from the processor, ``longest_edge`` (``size["longest_edge"]``); a processor whose patch or
    merge differs from the model's is refused (it would count other tokens than the model reads)."""
    merge = int(getattr(config, "spatial_merge_size", 1))
    patch = int(config.vision_config.patch_size)
    if settings is None:
        return {"merge_size": merge}
    proc = settings.processor
    checks = (
        ("spatial_merge_size", getattr(proc, "spatial_merge_size", None), merge, "the model merges"),
        ("patch_size", getattr(proc, "patch_size", None), patch, "the vision tower's patch is"),
    )
    for name, got, need, what in checks:
        if got is not None and int(got) != need:
            raise ValueError(
                f"the processor's {name}={got!r}, but {what} {need}: the processor would write another number of "
                f"[IMG] tokens than the model fills. Use the processor saved with the model, or one with {name}={need}."
            )
    return {"merge_size": merge, "longest_edge": _longest_edge(settings, "a Pixtral", "scales images down to", "...")}


#: PIL's resample codes -> the ``idefics3`` / ``smolvlm`` recipes' ``resample``.
_IDEFICS_RESAMPLE = {1: "lanczos", 3: "bicubic"}


def _idefics_tiling(config, settings) -> dict:
    """Idefics3's / SmolVLM's ``scale_factor`` (the model config's) and, from the processor, ``longest_edge``
    (``size["longest_edge"]``), ``do_image_splitting`` and ``resample``; a processor that cuts other tiles than
    the tower's (``max_image_size``) or writes another ``image_seq_len`` than the model fills is refused."""
    vision = config.vision_config
    tile, patch, scale = int(vision.image_size), int(vision.patch_size), int(config.scale_factor)
    if settings is None:
        return {"scale_factor": scale}
    seq = int(((tile // patch) ** 2) / (scale**2))  # the model's image_seq_len
    got = getattr(settings.processor, "image_seq_len", None)
    if got is not None and int(got) != seq:
        raise ValueError(
            f"the processor's image_seq_len={got!r}, but the model fills {seq} tokens per view ({tile} px tiles of "
            f"{patch} px patches, scale_factor={scale}): the text would not hold its features. Use the processor "
            f"saved with the model, or one with image_seq_len={seq}."
        )
    cut = _setting(settings.get("max_image_size"), "longest_edge")
    if cut is not None and int(cut) != tile:
        raise ValueError(
            f"the processor's max_image_size={{'longest_edge': {cut}}} cuts tiles of {cut} px, but the vision tower "
            f"takes {tile} px (its image_size). Use the processor saved with the model, or one with "
            f"max_image_size={{'longest_edge': {tile}}}."
        )
    edge = _longest_edge(settings, "an Idefics3 / SmolVLM", "resizes images to", 4 * tile)
    resample = settings.get("resample", 1)
    code = getattr(resample, "value", resample)
    if code not in _IDEFICS_RESAMPLE:
        raise ValueError(
            f"the processor has resample={resample!r}; hrperc's recipe resizes LANCZOS (the processors' default) or "
            f"bicubic. Use a processor with resample=1 (LANCZOS) or 3 (bicubic)."
        )
    return {
        "scale_factor": scale,
        "longest_edge": int(edge),
        "do_image_splitting": bool(settings.get("do_image_splitting", True)),
        "resample": _IDEFICS_RESAMPLE[code],
    }


def _connector_projection(projector: nn.Module, encoder) -> nn.Module:
    """The connector's projection: the encoder's tokens are already pixel-shuffled, as the connector does first."""
    return cast(nn.Module, projector.modality_projection)  # Idefics3SimpleMLP / SmolVLMSimpleMLP


#: Gemma 3's pan-and-scan options: the processor's names are the recipe's (honoured at the attached processor's call).
_PAN_AND_SCAN = (
    "do_pan_and_scan",
    "pan_and_scan_min_crop_size",
    "pan_and_scan_max_num_crops",
    "pan_and_scan_min_ratio_to_activate",
)
_BILINEAR = 2  # PIL's code: Gemma3ImageProcessor resizes bilinear, as the gemma3 recipe does


def _gemma3_views(config, settings) -> dict:
    """Gemma 3's ``mm_tokens_per_image`` (the model config's) and, from the processor, its pan-and-scan options;
    a processor that writes another ``image_seq_length`` than the model fills, or resizes other than
    bilinear, is refused."""
    per = int(config.mm_tokens_per_image)
    if settings is None:
        return {"mm_tokens_per_image": per}
    seq = getattr(settings.processor, "image_seq_length", None)
    if seq is not None and int(seq) != per:
        raise ValueError(
            f"the processor's image_seq_length={seq!r}, but the model fills mm_tokens_per_image={per} tokens per "
            f"view: the text would not hold its features. Use the processor saved with the model, or one with "
            f"image_seq_length={per}."
        )
    resample = settings.get("resample")
    code = getattr(resample, "value", resample)
    if resample is not None and code not in (_BILINEAR, "bilinear"):
        raise ValueError(
            f"the processor has resample={resample!r}; hrperc's gemma3 recipe resizes bilinear, as Gemma 3's "
            f"processor does. Use a processor with resample=2 (bilinear)."
        )
    read = {name: settings.get(name) for name in _PAN_AND_SCAN}
    return {"mm_tokens_per_image": per, **{k: v for k, v in read.items() if v is not None}}


def _gemma3_text(processor, layout) -> str:
    tok = processor.tokenizer
    return image_text(layout, boi=tok.boi_token, image=tok.image_token, eoi=tok.eoi_token)


def _gemma3_projection(projector: nn.Module, encoder) -> nn.Module:
    """Gemma 3's projector after its pooling: the encoder's tokens are already pooled, as the projector does first."""
    return Gemma3Projector(projector)


def _merged_projector(projector: nn.Module, encoder) -> nn.Module:
    from ...recipes.pixtral import MergedProjector

    return MergedProjector(projector, encoder.front_end.merge_size)


#: MiniCPM-V's image-processor options the ``minicpm_v`` recipe takes, under the same names.
_SLICE_OPTIONS = ("scale_resolution", "max_slice_nums", "slice_mode")


def _minicpm_slices(config, settings) -> dict:
    """MiniCPM-V's ``downsample_mode`` (the model config's) and, from the processor, ``scale_resolution``,
    ``max_slice_nums`` and ``slice_mode``; a processor whose ``downsample_mode`` or ``patch_size`` differs from
    the model's, or a model whose merger is not the one 2 x 2 round the processor counts for, is refused."""
    mode = str(config.downsample_mode)
    kernel, rounds = tuple(int(k) for k in config.merge_kernel_size), int(config.merger_times)
    if kernel != (2, 2) or rounds != 1:
        raise ValueError(
            f"the model has merge_kernel_size={kernel} and merger_times={rounds}; MiniCPM-V's processor counts "
            f"tokens for one 2 x 2 merge round, as the minicpm_v recipe does. Use a model with merge_kernel_size="
            f"(2, 2) and merger_times=1 (the released models')."
        )
    if settings is None:
        return {"downsample_mode": mode}
    patch = int(config.vision_config.patch_size)
    for name, need, what in (("downsample_mode", mode, "the model's"), ("patch_size", patch, "the vision tower's")):
        got = settings.get(name)
        if got is not None and got != need:
            raise ValueError(
                f"the processor's {name}={got!r}, but {what} is {need!r}: the processor would write another number "
                f"of image tokens than the model fills. Use the processor saved with the model, or one with "
                f"{name}={need!r}."
            )
    return {"downsample_mode": mode, **{k: settings.get(k) for k in _SLICE_OPTIONS if settings.get(k) is not None}}


def _minicpm_markers(processor) -> dict[str, str]:
    """The text of the ``minicpm_v`` layout's marker runs, the processor's tokens."""
    names = ("image_start", "image_end", "slice_start", "slice_end")
    return {**{name: getattr(processor, f"{name}_token") for name in names}, "row_end": "\n"}


def _merger_projector(projector: nn.Module, encoder) -> nn.Module:
    return MergerProjector(projector)


# --- tower checks ------------------------------------------------------------------------------------------
def _no_final_layernorm(tower, layer: int, num_layers: int, what: str) -> None:
    norm = getattr(tower, "layernorm", None)
    if (
        hf_blocks(layer, num_layers) == num_layers
        and layer < 0
        and norm is not None
        and not isinstance(norm, nn.Identity)
    ):
        raise ValueError(
            f"{what}: this InternViT applies a final LayerNorm to its last layer (use_mean_pooling=False), "
            f"which InternVLModel reads for vision_feature_layer=-1 and hrperc's layer -1 does not include. Use a "
            f"tower with use_mean_pooling=True (InternVL's checkpoints), or another vision_feature_layer."
        )


# --- the table ---------------------------------------------------------------------------------------------
TABLE: tuple[Family, ...] = (
    Family(
        "llava",
        "llava15",
        "LlavaForConditionalGeneration",
        options=(_square_pad,),
        square_pad=True,
        crop_size_with_center_crop=True,
        feature_select=True,
    ),
    Family(
        "llava_next",
        "llava_next",
        "LlavaNextForConditionalGeneration",
        options=(_pinpoints,),
        crop_size_with_center_crop=True,
        image_sizes_second=True,
        newline="image_newline",
        feature_select=True,
    ),
    Family(
        "llava_onevision",
        "llava_onevision",
        "LlavaOnevisionForConditionalGeneration",
        options=(_pinpoints, _anyres_max),
        image_sizes_second=True,
        newline="image_newline",
        feature_select=True,
        several_images=(
            "LLaVA-OneVision encodes multi-image prompts another way (one square view each), which hrperc's "
            "llava_onevision recipe does not reproduce"
        ),
    ),
    Family(
        "internvl",
        "internvl",
        "InternVLForConditionalGeneration",
        options=(_pixel_shuffle, _processor_tiles),
        tower_checks=(_no_final_layernorm,),
        image_brackets=("start_image_token", "end_image_token"),
        features="one_sequence",
    ),
)
# Qwen2-VL, Qwen2.5-VL and Qwen3-VL differ only in their recipes (tower, budget, normalization) and Qwen3-VL's
# deepstack features, which its LLM adds to the outputs of its first layers.
_NATIVE = dict(
    options=(_pixel_budget,),
    tower="visual",
    projector=None,
    backbone=QwenBackbone,
    tiles=False,
    feature_layer=False,
    grid_thw=True,
)
TABLE += (
    Family("qwen2_vl", "qwen2_vl", "Qwen2VLForConditionalGeneration", **_NATIVE),  # type: ignore[arg-type]
    Family("qwen2_5_vl", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", **_NATIVE),  # type: ignore[arg-type]
    Family(
        "qwen3_vl",
        "qwen3_vl",
        "Qwen3VLForConditionalGeneration",
        extras=(("deepstack_features", "deepstack."),),
        features_output="BaseModelOutputWithDeepstackFeatures",
        **_NATIVE,  # type: ignore[arg-type]
    ),
)
# Pixtral-12B (LLaVA with a Pixtral tower) and Mistral 3: one recipe; Mistral 3 merges 2 x 2 patches in its
# projector. The model embeds [IMG_BREAK] / [IMG_END] itself: only the [IMG] features go to it.
_PIXTRAL = dict(
    options=(_pixtral_geometry,),
    backbone=PixtralBackbone,
    tiles=False,
    image_rows=("image_break_token", "image_end_token"),
)
TABLE += (
    Family(
        "llava",
        "pixtral",
        "LlavaForConditionalGeneration",
        vision_type="pixtral",
        **_PIXTRAL,  # type: ignore[arg-type]
    ),
    Family(
        "mistral3",
        "pixtral",
        "Mistral3ForConditionalGeneration",
        select_strategy=False,
        projector_map=_merged_projector,
        **_PIXTRAL,  # type: ignore[arg-type]
    ),
)
# Idefics3 and SmolVLM: tiles + a global image in text markers; the recipe shuffles, the connector projects.
_IDEFICS = dict(
    options=(_idefics_tiling,),
    tower="vision_model",
    projector="connector",
    backbone=IdeficsBackbone,
    tiles=False,
    feature_layer=False,
    projector_map=_connector_projection,
    pixel_mask_second=True,
    image_sizes_input=False,
    resample_read=True,
)
TABLE += (
    Family(
        "idefics3",
        "idefics3",
        "Idefics3ForConditionalGeneration",
        tile_markers=("fake_image_token", "global_image_tag"),
        **_IDEFICS,  # type: ignore[arg-type]
    ),
    Family(
        "smolvlm",
        "smolvlm",
        "SmolVLMForConditionalGeneration",
        tile_markers=("fake_image_token", "global_image_token"),
        **_IDEFICS,  # type: ignore[arg-type]
    ),
)
# MiniCPM-V 4.6 and 4.7: one image path (4.7 reuses 4.6's image processor, tower and merger); the markers are
# text the model embeds itself, so only the image tokens' features go to it. 4.7's LLM positions read
# target_sizes and mm_token_type_ids, which the attached processor returns as the original does.
_MINICPM_V = dict(
    options=(_minicpm_slices,),
    projector="merger",
    backbone=MiniCPMVBackbone,
    tiles=False,
    feature_layer=False,
    projector_map=_merger_projector,
    image_markers=_minicpm_markers,
    image_ids=("image_id_start_token", "image_id_end_token"),
    view_sizes="target_sizes",
    pixels_one_row=True,
)
TABLE += (
    Family("minicpmv4_6", "minicpm_v", "MiniCPMV4_6ForConditionalGeneration", **_MINICPM_V),  # type: ignore[arg-type]
    Family("minicpmv4_7", "minicpm_v", "MiniCPMV4_7ForConditionalGeneration", **_MINICPM_V),  # type: ignore[arg-type]
)
# Gemma 3: one square SigLIP view per image and per pan-and-scan crop; the recipe pools, the projector projects.
TABLE += (
    Family(
        "gemma3",
        "gemma3",
        "Gemma3ForConditionalGeneration",
        options=(_gemma3_views,),
        features="one_sequence",
        backbone=Gemma3Tower,
        feature_layer=False,
        projector_map=_gemma3_projection,
        image_sizes_input=False,
        resample_read=True,
        image_text=_gemma3_text,
        token_types="token_type_ids",
        call_options=_PAN_AND_SCAN,
    ),
)
_BY_TYPE = {f.key: f for f in TABLE}
_BY_PAIR = {(f.model_type, f.vision_type): f for f in TABLE if f.vision_type is not None}
#: transformers ``model_type`` (``<model_type>_<vision model_type>`` for an entry of one tower type, e.g.
#: ``"llava_pixtral"``) -> the hrperc recipe that reproduces its image path.
FAMILIES = {f.key: f.recipe for f in TABLE}


def family_of(model_type, vision_type=None) -> Family | None:
    """The :class:`Family` of a ``model_type`` (or an entry's :attr:`Family.key`) whose vision tower has
    ``vision_type`` (its ``vision_config.model_type``); ``None`` when hrperc does not integrate it."""
    if not isinstance(model_type, str):
        return None
    return _BY_PAIR.get((model_type, vision_type)) or _BY_TYPE.get(model_type)


# --- recipe settings the attached processor can change ----------------------------------------------------------
#: Recipe setting -> ``{recipe: its default}`` for the recipes that have it (the value an encoder runs when
#: its ``recipe_options`` do not name the setting; the recipes' own defaults, checked by the tests).
RECIPE_SETTINGS: dict[str, dict[str, object]] = {
    "pad": {"llava15": True, "s2": True},  # pad to a square (else resize the shortest edge + centre-crop)
    "min_tiles": {"internvl": 1},  # InternVL's tiling
    "max_tiles": {"internvl": 12},
}


def recipes_with(setting: str) -> tuple[str, ...]:
    """The recipes that have ``setting`` (see :data:`RECIPE_SETTINGS`)."""
    return tuple(RECIPE_SETTINGS[setting])


def recipe_setting(encoder, setting: str):
    """The value of ``setting`` that ``encoder`` (built by ``create_encoder``) runs with: its
    ``recipe_options``, else its recipe's default; ``None`` when its recipe has no such setting."""
    defaults = RECIPE_SETTINGS[setting]
    if encoder.recipe not in defaults:
        return None
    return encoder.recipe_options.get(setting, defaults[encoder.recipe])
