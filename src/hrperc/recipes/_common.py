"""What every recipe file shares: the backbone argument, the encoder options, the DCM+DEM switch."""

from __future__ import annotations

from ..backbones import VisionBackbone, create_backbone, wrap_backbone
from ..encoder import HighResEncoder

#: The :class:`~hrperc.HighResEncoder` options a recipe passes through.
ENCODER_OPTIONS = ("layer", "max_batch", "train_backbone", "grad_checkpointing", "check_range")


def as_backbone(backbone, layer: int) -> VisionBackbone:
    """A :class:`VisionBackbone` from a backbone, a model :func:`~hrperc.wrap_backbone` takes, or a name;
    a model is wrapped reading ``layer`` (the recipe's), so a shallow tower need not have LLaVA's -2."""
    if isinstance(backbone, str):
        return create_backbone(backbone, layer=layer)
    return wrap_backbone(backbone, layer=layer)


def split_options(recipe: str, options: dict, own: tuple[str, ...]) -> tuple[dict, dict]:
    """``(front-end options, encoder options)``; an unknown name is refused with the recipe's list."""
    unknown = sorted(set(options) - set(own) - set(ENCODER_OPTIONS))
    if unknown:
        raise TypeError(
            f"create_encoder({recipe!r}): unknown option(s) {unknown}; pass only this recipe's options "
            f"{sorted(own)} or the encoder options {sorted(ENCODER_OPTIONS)}."
        )
    return ({k: v for k, v in options.items() if k in own}, {k: v for k, v in options.items() if k in ENCODER_OPTIONS})


def build(frontend, backbone: VisionBackbone, dem, layer: int, encoder_options: dict) -> HighResEncoder:
    """The encoder of a recipe: ``frontend`` around ``backbone``, reading ``layer`` unless overridden."""
    encoder_options = {"layer": layer, **encoder_options}
    return HighResEncoder(backbone, frontend, dem=dem, **encoder_options)  # dem="default": a DEM only with dcm=True
