"""What every recipe file shares: the backbone argument, the options (declared once), the runner."""

from __future__ import annotations

import inspect

from ..backbones import VisionBackbone, create_backbone, wrap_backbone
from ..encoder import HighResEncoder

#: The :class:`~hrperc.HighResEncoder` options a recipe passes through. ``dem``: a recipe's DCM+DEM upgrade
#: (``dcm=True``) takes a DEM; ``None`` (no DEM) and ``"default"`` are taken by every recipe, so that an
#: encoder can be rebuilt from ``recipe_options`` plus ``dem=encoder.dem``.
ENCODER_OPTIONS = ("layer", "max_batch", "train_backbone", "grad_checkpointing", "check_range", "dem")


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


def split_options(
    recipe: str, options: dict, own: tuple[str, ...], encoder: tuple[str, ...] = ENCODER_OPTIONS
) -> tuple[dict, dict]:
    """``(the recipe's options, encoder options)``; an unknown name is refused with the recipe's list."""
    unknown = sorted(set(options) - set(own) - set(encoder))
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown}; pass only this recipe's options "
            f"{sorted(own)} or the encoder options {sorted(encoder)}."
        )
    return {k: v for k, v in options.items() if k in own}, {k: v for k, v in options.items() if k in encoder}


def build(front_end, backbone: VisionBackbone, encoder_options: dict) -> HighResEncoder:
    """The encoder of a recipe: ``front_end`` around ``backbone`` (``encoder_options`` hold its ``layer``, and
    ``dem`` when given; without it the runner's ``"default"`` applies)."""
    return HighResEncoder(backbone, front_end, **encoder_options)
