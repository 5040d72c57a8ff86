"""``llava_onevision``: LLaVA-OneVision's single-image front end, ``anyres_max_9``.

LLaVA-NeXT's anyres (:mod:`hrperc.recipes.llava_next`) with OneVision's settings, exactly
``LlavaOnevisionImageProcessor`` (transformers' default torchvision backend), ``LlavaOnevisionProcessor``'s
token count and ``LlavaOnevisionModel.pack_image_features`` before the projector:

* 36 pinpoints, every ``(a*t, b*t)`` for ``a, b`` in 1..6 (``t = 384`` for SigLIP so400m-patch14-384);
* the ViT's last layer (``layer=-1``), every patch token (SigLIP has no CLS);
* when the unpadded map holds more than 9 tiles' worth of tokens, it is shrunk bilinearly by
  ``r = sqrt(rows*cols / (9 * ht**2))`` (only if ``r > 1.1``) -- the model does this on *projected*
  features, so ``forward(project=...)`` applies the projector first;
* one newline slot per row of the (shrunk) map, after a base view of ``ht*wt`` tokens.

Options: ``pinpoints``, ``max_tiles`` (default 9; ``None`` turns the shrink off), ``tie_break``,
``newline``, ``dcm``, ``dem``, ``layer`` (default -1) and the encoder options.

Example::

    >>> import hrperc
    >>> enc = hrperc.create_encoder("llava_onevision", "timm:vit_tiny_patch16_224")
    >>> enc.num_tokens((2000, 3000)), enc.view_plan((2000, 3000)).grid     # shrunk from (112, 168)
    (1964, (4, 6))
"""

from __future__ import annotations

from ..ops import anyres
from . import register_recipe
from ._common import as_backbone, build, split_options
from .llava_next import AnyresFrontEnd, scaled_pinpoints

__all__ = ["build_llava_onevision"]

_OWN = ("pinpoints", "max_tiles", "tie_break", "newline", "dcm", "dem")


@register_recipe("llava_onevision")
def build_llava_onevision(backbone, **options):
    """LLaVA-OneVision's ``anyres_max_9`` front end around ``backbone`` (see the module docs)."""
    own, enc = split_options("llava_onevision", options, _OWN)
    bb = as_backbone(backbone, enc.get("layer", -1))
    pinpoints = own.get("pinpoints")  # an empty list is refused by the front end, never read as "the defaults"
    if pinpoints is None:
        pinpoints = scaled_pinpoints(anyres.ONEVISION_PINPOINTS, 384, bb.image_size[0])
    fe = AnyresFrontEnd(bb.image_size, bb.patch_size, pinpoints, tie_break=own.get("tie_break", "transformers"),
                        newline=own.get("newline", True), max_tiles=own.get("max_tiles", 9), dcm=own.get("dcm", False),
                        name="llava_onevision")  # fmt: skip
    return build(fe, bb, own.get("dem", "default"), -1, enc)
