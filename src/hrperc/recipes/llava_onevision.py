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

``layer`` may be a list of layers (the model's list ``vision_feature_layer``), concatenated on the channels
in its order; ``select_strategy`` is the model's ``vision_feature_select_strategy`` (``"full"``, OneVision's
default, on its SigLIP tower: every patch token; refused on a tower with a class token), as in
:mod:`hrperc.recipes.llava_next`.

Options: the keyword arguments of :class:`~hrperc.recipes.llava_next.AnyresFrontEnd` (``pinpoints``,
``max_tiles``: default 9 here, ``None`` turns the shrink off; ``tie_break``, ``newline``, ``dcm``,
``select_strategy``), ``dem``, ``layer`` (default -1; an int or a list) and the encoder options.

Example::

    >>> import hrperc
    >>> enc = hrperc.create_encoder("llava_onevision", "timm:vit_tiny_patch16_224")
    >>> enc.num_tokens((2000, 3000)), enc.plan((2000, 3000)).grid     # shrunk from (112, 168)
    (1964, (4, 6))
"""

from __future__ import annotations

from ..ops import anyres
from . import register_recipe
from .llava_next import AnyresFrontEnd, build_anyres

__all__ = ["build_llava_onevision"]


@register_recipe(
    "llava_onevision",
    front_end=AnyresFrontEnd,
    leave_out=("name",),
    # anyres_max_9 (the front end's own default, None, is LLaVA-NeXT's)
    defaults={"layer": -1, "max_tiles": 9},
    notes={"pinpoints": "OneVision's 36 canvases of 384 px tiles, scaled to the backbone's tile"},
)
def build_llava_onevision(backbone, **options):
    """LLaVA-OneVision's ``anyres_max_9`` front end around ``backbone`` (see the module docs)."""
    return build_anyres("llava_onevision", backbone, options, pinpoints=anyres.ONEVISION_PINPOINTS, reference_tile=384)
