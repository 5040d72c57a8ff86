"""``smolvlm``: SmolVLM's image splitting -- the ``idefics3`` front end (:mod:`hrperc.recipes.idefics3`) with the
defaults of SmolVLM-256M / SmolVLM-500M on their 512 px / 16 px tower: ``scale_factor=4`` (64 tokens per
view), ``longest_edge = 4 * 512 = 2048``, LANCZOS resizes.

``SmolVLMImageProcessor`` is ``Idefics3ImageProcessor``'s code and ``SmolVLMProcessor`` writes the same
``<fake_token_around_image>`` / ``<row_r_col_c>`` / ``<global-img>`` text, so everything the ``idefics3``
recipe says holds here: the tiles and the global image, the layout runs ``"row_<r>_col_<c>"`` / ``"global"``,
``project=model.model.connector.modality_projection``, ``dcm=True``. The options are the same
(``longest_edge``, ``scale_factor``, ``do_image_splitting``, ``resample``, ``dcm``, ``dem``, ``layer`` and the
encoder options); SmolVLM2-2.2B (384 px tiles, ``scale_factor=3``) passes its scale. A tower whose token grid
the scale does not divide (scale 4 on Idefics3's 364 / 14 = 26 tokens) is refused.

Example::

    >>> import torch, hrperc
    >>> from transformers import SmolVLMVisionConfig
    >>> from transformers.models.smolvlm.modeling_smolvlm import SmolVLMVisionTransformer
    >>> cfg = SmolVLMVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                           num_attention_heads=2, image_size=64, patch_size=16)
    >>> enc = hrperc.create_encoder("smolvlm", SmolVLMVisionTransformer(cfg).eval())   # 4 x 4 tokens -> 1 per view
    >>> enc.plan((716, 1272)).grid, enc.num_tokens((716, 1272)), enc.token_width   # 12 tiles + the global image
    ((3, 4), 13, 512)
"""

from __future__ import annotations

from . import register_recipe
from .idefics3 import IDEFICS_SPEC, build_idefics

__all__ = ["build_smolvlm"]


@register_recipe("smolvlm", **IDEFICS_SPEC, defaults={"layer": -1, "scale_factor": 4})
def build_smolvlm(backbone, **options):
    """SmolVLM's front end around ``backbone`` (see :mod:`hrperc.recipes.idefics3` for the options)."""
    return build_idefics("smolvlm", backbone, options)
