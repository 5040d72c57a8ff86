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
from typing import Any

from torch import nn

from ...backbones.hf_vit import HFBackbone
from ...backbones.pixtral import PixtralBackbone
from ...backbones.qwen_vl import QwenBackbone

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
    take them; ``False``: the tower's last block through its merger, no such arguments. ``grid_thw`` --
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
    grid_thw: bool = False
    extras: tuple[tuple[str, str], ...] = ()
    features_output: str = "BaseModelOutputWithPooling"
    vision_type: str | None = None
    select_strategy: bool = True
    image_rows: tuple[str, str] | None = None
    projector_map: Callable[[nn.Module, Any], nn.Module] | None = None

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
    edge = _setting(settings.get("size"), "longest_edge")
    if edge is None:
        raise ValueError(
            f"the processor's size={settings.get('size')!r} lacks 'longest_edge', the side a Pixtral processor "
            f"scales images down to. Use the processor saved with the model, or one built with "
            f"size={{'longest_edge': ...}}."
        )
    return {"merge_size": merge, "longest_edge": int(edge)}


def _merged_projector(projector: nn.Module, encoder) -> nn.Module:
    from ...recipes.pixtral import MergedProjector

    return MergedProjector(projector, encoder.front_end.merge_size)


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
    ),
    Family(
        "llava_next",
        "llava_next",
        "LlavaNextForConditionalGeneration",
        options=(_pinpoints,),
        crop_size_with_center_crop=True,
        image_sizes_second=True,
        newline="image_newline",
    ),
    Family(
        "llava_onevision",
        "llava_onevision",
        "LlavaOnevisionForConditionalGeneration",
        options=(_pinpoints, _anyres_max),
        image_sizes_second=True,
        newline="image_newline",
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
