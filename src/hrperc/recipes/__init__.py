"""Named front ends: ``hrperc.create_encoder(recipe, backbone, **options) -> HighResEncoder``.

A recipe is the whole image path of a published system -- how an image is cut into views, which
layer is read, how the tokens are assembled -- around any backbone, with that system's defaults
(tile size, patch size and normalization come from the backbone). Each recipe is one file in this
package that registers a builder with :func:`register_recipe`; the files are found and imported
here, so adding a recipe is adding a file. ``docs/recipes.md`` has the table of views, token counts
and references, and how to write a recipe.

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
from collections.abc import Callable

import numpy as np
import torch

from .._errors import public

__all__ = ["create_encoder", "list_recipes", "register_recipe"]

_RECIPES: dict[str, Callable] = {}


def register_recipe(name: str):
    """Decorator: register ``builder(backbone, **options) -> HighResEncoder`` as recipe ``name``."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_recipe: name={name!r}; use a Python identifier such as 'llava_next'.")

    def decorate(builder: Callable) -> Callable:
        if name in _RECIPES and _RECIPES[name] is not builder:
            raise ValueError(f"register_recipe: a recipe named {name!r} is already registered; pick another name.")
        _RECIPES[name] = builder
        return builder

    return decorate


def list_recipes() -> tuple[str, ...]:
    """Names of the registered recipes, sorted."""
    return tuple(sorted(_RECIPES))


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
        **options: the recipe's options (see its module), e.g. ``dem=`` for ``"inf_llava"``.
    """
    if recipe not in _RECIPES:
        raise ValueError(f"recipe={recipe!r} is not a known recipe; pass one of {list_recipes()}.")
    encoder = _RECIPES[recipe](backbone, **options)
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
