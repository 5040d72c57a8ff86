"""Named front ends: ``hrperc.create_encoder(recipe, backbone, **options) -> HighResEncoder``.

A recipe is the whole image path of a published system -- how an image is cut into views, which
layer is read, how the tokens are assembled -- around any backbone, with that system's defaults
(tile size, patch size and normalization come from the backbone). Each recipe is one file in this
package that registers a builder with :func:`register_recipe`, declaring its options (its front end's
class, the options it sets itself, its own defaults: a :class:`RecipeSpec`, which :func:`recipe_options`
reads); the files are found and imported here, so adding a recipe is adding a file. ``docs/recipes.md``
has the table of views, token counts and references, and how to write a recipe.

===================  ===========================================================================
``llava15``          LLaVA-1.5: pad to a square, one tile (:mod:`hrperc.recipes.llava15`)
``llava_next``       LLaVA-NeXT anyres: base view + pinpoint tiles, unpadding, newline slots
``llava_onevision``  LLaVA-OneVision ``anyres_max_9``: 36 pinpoints, shrink to 9 tiles' worth
``internvl``         InternVL: closest-aspect tiles (1..12), thumbnail, pixel shuffle 0.5
``s2``               S2 multi-scale: scales (1, 2), merged, area-resized, concatenated on channels
``infimm_hd``        InfiMM-HD: aspect-kept tiles of the ViT's size + a global view
``inf_llava``        the released INF-LLaVA front end (:mod:`hrperc.recipes.inf_llava`)
``qwen2_vl``         Qwen2-VL: one view of the image's budgeted own size, packed (:mod:`hrperc.recipes.qwen2_vl`)
``qwen2_5_vl``       Qwen2.5-VL: the same on its windowed tower
``qwen3_vl``         Qwen3-VL: 32-pixel tokens, the released budget and normalization, deepstack features
``pixtral``          Pixtral-12B / Mistral 3: own size, packed; [IMG_BREAK] / [IMG_END] as slots
``idefics3``         Idefics3: longest edge 4 tiles, tiles + global image, pixel shuffle 2; marker runs
``smolvlm``          SmolVLM: the same with SmolVLM-256M / 500M's defaults (512 px tiles, pixel shuffle 4)
``gemma3``           Gemma 3: one square SigLIP view (+ pan-and-scan crops), pooled to 256 tokens each
``minicpm_v``        MiniCPM-V 4.6 / 4.7: LLaVA-UHD slices (<= 9 of 448 px) + a source image; markers as slots
===================  ===========================================================================

Example::

    >>> import hrperc
    >>> hrperc.list_recipes()  # doctest: +NORMALIZE_WHITESPACE
    ('gemma3', 'idefics3', 'inf_llava', 'infimm_hd', 'internvl', 'llava15', 'llava_next', 'llava_onevision',
     'minicpm_v', 'pixtral', 'qwen2_5_vl', 'qwen2_vl', 'qwen3_vl', 's2', 'smolvlm')
    >>> enc = hrperc.create_encoder("llava_next", "timm:vit_tiny_patch16_224")     # random weights
    >>> enc.num_tokens((1000, 700))
    784
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from .._errors import public
from ._common import (
    EMPTY,
    ENCODER_OPTIONS,
    OptionSpec,
    encoder_signature,
    options_of,
    signature_options,
    split_options,
)

__all__ = [
    "OptionSpec",
    "RecipeSpec",
    "create_encoder",
    "list_recipes",
    "recipe_options",
    "recipe_spec",
    "register_recipe",
    "split_options",
]


@dataclass(frozen=True)
class RecipeSpec:
    """What :func:`register_recipe` records of a recipe (like timm's ``pretrained_cfg``): read by its builder
    (:func:`~hrperc.recipes._common.split_options`) and by :func:`recipe_options` / ``hrperc recipes``.

    ``front_end``: the class whose constructor declares the recipe's own options (its keyword parameters, less
    ``tile_size`` / ``patch_size`` and ``leave_out``: what the recipe sets itself, e.g. from the backbone);
    ``None``: the recipe declares no options (its builder checks what it is given). ``encoder_options``: the
    :class:`~hrperc.HighResEncoder` options it passes through. ``defaults``: the recipe's own values where they
    differ from the constructors' (each recipe's ``layer``, OneVision's ``max_tiles=9``); ``notes``: how the
    recipe fills a default the constructor leaves open (``None`` or none), in words."""

    name: str
    builder: Callable
    front_end: type | None = None
    leave_out: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    notes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    encoder_options: tuple[str, ...] = ENCODER_OPTIONS

    @property
    def declared(self) -> bool:
        """Whether the recipe declares its options (a ``front_end`` is given)."""
        return self.front_end is not None

    @property
    def own_options(self) -> tuple[str, ...]:
        """The names of the front end's options, in its constructor's order (``()`` when not declared)."""
        return () if self.front_end is None else options_of(self.front_end, leave_out=self.leave_out)

    @property
    def option_names(self) -> tuple[str, ...]:
        """Every option the recipe takes: the front end's, then the encoder's (``()`` when not declared)."""
        return (*self.own_options, *self.encoder_options) if self.declared else ()


_RECIPES: dict[str, RecipeSpec] = {}


def register_recipe(
    name: str,
    *,
    front_end: type | None = None,
    leave_out: tuple[str, ...] = (),
    defaults: Mapping[str, Any] | None = None,
    notes: Mapping[str, str] | None = None,
    encoder_options: tuple[str, ...] = ENCODER_OPTIONS,
):
    """Decorator: register ``builder(backbone, **options) -> HighResEncoder`` as recipe ``name``, with its
    :class:`RecipeSpec` (see there for the arguments). A recipe that passes ``front_end`` declares its options:
    its builder splits them with :func:`~hrperc.recipes._common.split_options`, which refuses any other name and
    fills in ``defaults``; :func:`recipe_options` lists them. ``leave_out``, ``defaults`` and ``notes`` must
    name options the recipe has."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_recipe: name={name!r}; use a Python identifier such as 'llava_next'.")
    if front_end is not None and not isinstance(front_end, type):
        raise TypeError(
            f"register_recipe({name!r}): front_end={front_end!r} is not a class; pass the front end's class "
            f"(its constructor declares the options), e.g. front_end=AnyresFrontEnd, or leave it unset."
        )
    leave_out = tuple(leave_out)
    encoder_options = tuple(encoder_options)
    defaults, notes = dict(defaults or {}), dict(notes or {})
    if front_end is None and (leave_out or defaults or notes):
        raise ValueError(
            f"register_recipe({name!r}): leave_out, defaults and notes describe a front end's options; pass "
            f"front_end= (the class whose constructor declares them) too, or leave them unset."
        )
    if front_end is not None:
        params = signature_options(front_end)
        unknown_left = sorted(set(leave_out) - set(params))
        if unknown_left:
            raise ValueError(
                f"register_recipe({name!r}): leave_out={leave_out} names {unknown_left}, which "
                f"{front_end.__name__}'s constructor does not take; pass only names of {sorted(params)}."
            )
        unknown_enc = sorted(set(encoder_options) - set(encoder_signature()))
        if unknown_enc:
            raise ValueError(
                f"register_recipe({name!r}): encoder_options names {unknown_enc}, which HighResEncoder does not "
                f"take; pass only names of {sorted(encoder_signature())}."
            )
        known = set(options_of(front_end, leave_out=leave_out)) | set(encoder_options)
        for arg, given in (("defaults", defaults), ("notes", notes)):
            extra = sorted(set(given) - known)
            if extra:
                raise ValueError(
                    f"register_recipe({name!r}): {arg} names {extra}, which are not options of the recipe; "
                    f"pass only names of {sorted(known)}."
                )

    def decorate(builder: Callable) -> Callable:
        if name in _RECIPES and _RECIPES[name].builder is not builder:
            raise ValueError(f"register_recipe: a recipe named {name!r} is already registered; pick another name.")
        _RECIPES[name] = RecipeSpec(
            name,
            builder,
            front_end,
            leave_out,
            MappingProxyType(defaults),
            MappingProxyType(notes),
            encoder_options,
        )
        return builder

    return decorate


def list_recipes() -> tuple[str, ...]:
    """Names of the registered recipes, sorted."""
    return tuple(sorted(_RECIPES))


def recipe_spec(name: str) -> RecipeSpec:
    """The :class:`RecipeSpec` recipe ``name`` was registered with."""
    if name not in _RECIPES:
        raise ValueError(f"recipe={name!r} is not a known recipe; pass one of {list_recipes()}.")
    return _RECIPES[name]


def recipe_options(name: str) -> dict[str, OptionSpec]:
    """The options recipe ``name`` takes, ``name -> OptionSpec``, in order: its front end's (the keyword parameters
    of the constructor), then the encoder's (:class:`~hrperc.HighResEncoder`'s); each ``default`` is the recipe's
    own where it declares one, else the constructor's (``inspect.Parameter.empty``: the recipe computes it, e.g.
    from the backbone; ``note`` says how). ``{}`` for a recipe registered without ``front_end=``.

    Example::

        >>> opts = recipe_options("qwen3_vl")
        >>> opts["max_pixels"].default, opts["layer"].default, opts["layer"].owner
        (16777216, -1, 'encoder')
        >>> opts["dcm"].annotation, opts["dcm"].default
        ('bool', False)
    """
    spec = recipe_spec(name)
    if spec.front_end is None:
        return {}
    out: dict[str, OptionSpec] = {}
    for owner, names, table in (
        ("front end", spec.own_options, signature_options(spec.front_end)),
        ("encoder", spec.encoder_options, encoder_signature()),
    ):
        for key in names:
            annotation, default = table.get(key, ("", EMPTY))
            default = spec.defaults.get(key, default)
            out[key] = OptionSpec(key, owner, annotation, default, spec.notes.get(key, ""))
    return out


def _named(recipe, *_, **__) -> str:
    return f"create_encoder({recipe!r})"


@public(name=_named)
def create_encoder(recipe: str, backbone, **options):
    """The :class:`~hrperc.HighResEncoder` of front end ``recipe`` around ``backbone``.

    Args:
        recipe: a name from :func:`list_recipes`, e.g. ``"inf_llava"``.
        backbone: a :class:`~hrperc.backbones.VisionBackbone`, a model :func:`~hrperc.wrap_backbone`
            accepts, or a :func:`~hrperc.create_backbone` name; tile size, patch size and
            normalization come from it.
        **options: the recipe's options (see its module; :func:`recipe_options` lists them with their
            defaults), e.g. ``dem=`` for ``"inf_llava"``.
    """
    encoder = recipe_spec(recipe).builder(backbone, **options)
    # What built it (like timm's pretrained_cfg): integrations save it to rebuild the same front end. The
    # builder has checked every option; numpy / tensor values are kept as the plain Python values they stand for.
    encoder.recipe = recipe
    encoder.recipe_options = {k: _plain(v) for k, v in options.items() if k != "dem"}
    return encoder


def _plain(value):
    """``value`` with numpy scalars, arrays and tensors as Python scalars and lists (lists and tuples kept)."""
    if isinstance(value, (np.generic, np.ndarray, torch.Tensor)):
        return value.tolist() if getattr(value, "ndim", 0) else value.item()
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
del _info
