"""Named front ends: ``hrperc.create_encoder(recipe, backbone, **options) -> HighResEncoder``.

A recipe is the whole image path of a published system -- how an image is cut into tiles, which
layer is read, how the tokens are combined -- around any backbone, with that system's defaults.
Each recipe is one file in this package that registers a builder with :func:`register_recipe`;
the files are found and imported here, so adding a recipe is adding a file.

==============  ==============================================================================
``inf_llava``   the released INF-LLaVA front end (:mod:`hrperc.recipes.inf_llava`)
==============  ==============================================================================

Example::

    >>> import hrperc
    >>> hrperc.list_recipes()
    ('inf_llava',)
    >>> enc = hrperc.create_encoder("inf_llava", "timm:vit_tiny_patch16_224")     # random weights
    >>> enc.num_tokens((1000, 700))
    196
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

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
        raise ValueError(f"create_encoder: recipe={recipe!r} is not a known recipe; pass one of {list_recipes()}.")
    return _RECIPES[recipe](backbone, **options)


for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
del _info
