"""What every recipe file shares: the backbone argument, the options (declared once), the runner."""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass
from typing import Any

from ..backbones import VisionBackbone, create_backbone, wrap_backbone
from ..encoder import HighResEncoder

#: The :class:`~hrperc.HighResEncoder` options a recipe passes through. ``dem``: a recipe's DCM+DEM upgrade
#: (``dcm=True``) takes a DEM; ``None`` (no DEM) and ``"default"`` are taken by every recipe, so that an
#: encoder can be rebuilt from ``recipe_options`` plus ``dem=encoder.dem``.
ENCODER_OPTIONS = ("layer", "max_batch", "train_backbone", "grad_checkpointing", "check_range", "dem")

#: No default: the recipe computes the value (e.g. from the backbone's tile).
EMPTY = inspect.Parameter.empty


@dataclass(frozen=True)
class OptionSpec:
    """One option of a recipe: ``name``; ``owner``: ``"front end"`` (its front end's constructor) or
    ``"encoder"`` (passed to :class:`~hrperc.HighResEncoder`); ``annotation``: the constructor's annotation
    as written (``""`` when there is none; an alias of a ``Literal`` written out, ``Literal['resize', ...]``);
    ``default``: the recipe's value when it declares one, else the constructor's (:data:`EMPTY`: none, the
    recipe computes it); ``note``: how the recipe fills a default the constructor leaves open, in words."""

    name: str
    owner: str
    annotation: str = ""
    default: Any = EMPTY
    note: str = ""


def as_backbone(backbone, layer: int) -> VisionBackbone:
    """A :class:`VisionBackbone` from a backbone, a model :func:`~hrperc.wrap_backbone` takes, or a name;
    a model is wrapped reading ``layer`` (the recipe's), so a shallow tower need not have LLaVA's -2."""
    if isinstance(backbone, str):
        return create_backbone(backbone, layer=layer)
    return wrap_backbone(backbone, layer=layer)


def options_of(cls, *, leave_out: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The options ``cls`` declares: the keyword parameters of its constructor (the one place their names
    and defaults are written), less ``tile_size`` / ``patch_size`` (the backbone's) and ``leave_out``."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = inspect.signature(cls.__init__).parameters.values()
    skip = {"self", "tile_size", "patch_size", *leave_out}
    return tuple(p.name for p in params if p.kind in kinds and p.name not in skip)


def signature_options(cls) -> dict[str, tuple[str, Any]]:
    """``name -> (annotation text, default)`` of the keyword parameters of ``cls``'s constructor; an alias of a
    ``Literal`` (``Fit``) is written out, so that its choices show."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that names what only type checkers import: keep the text
        hints = {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    out = {}
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.kind not in kinds or p.name == "self":
            continue
        ann = p.annotation
        text = "" if ann is EMPTY else ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
        if text.isidentifier() and typing.get_origin(hints.get(p.name)) is typing.Literal:
            text = f"Literal{list(typing.get_args(hints[p.name]))}"
        out[p.name] = (text, p.default)
    return out


@functools.cache
def encoder_signature() -> dict[str, tuple[str, Any]]:
    """:func:`signature_options` of :class:`~hrperc.HighResEncoder` (the encoder options' types and defaults)."""
    return signature_options(HighResEncoder)


def split_options(recipe: str, options: dict) -> tuple[dict, dict]:
    """``(the front end's options, encoder options)`` of ``options`` by recipe ``recipe``'s
    :class:`~hrperc.recipes.RecipeSpec`, each with the recipe's declared ``defaults`` filled in where not
    given; an unknown name is refused with the recipe's list."""
    from . import recipe_spec  # the package imports this module first: the registry is read at build time

    spec = recipe_spec(recipe)
    own, encoder = spec.own_options, spec.encoder_options
    unknown = sorted(set(options) - set(own) - set(encoder))
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown}; pass only this recipe's options "
            f"{sorted(own)} or the encoder options {sorted(encoder)}."
        )
    values = {**spec.defaults, **options}
    return {k: v for k, v in values.items() if k in own}, {k: v for k, v in values.items() if k in encoder}


def build(front_end, backbone: VisionBackbone, encoder_options: dict) -> HighResEncoder:
    """The encoder of a recipe: ``front_end`` around ``backbone`` (``encoder_options`` hold its ``layer``, and
    ``dem`` when given; without it the runner's ``"default"`` applies)."""
    return HighResEncoder(backbone, front_end, **encoder_options)
