"""``qwen2_5_vl``: Qwen2.5-VL's native-resolution front end -- Qwen2-VL's (:mod:`hrperc.recipes.qwen2_vl`)
on a Qwen2.5-VL tower, whose window attention (and the reordering it needs) stays the tower's own.

Exactly ``Qwen2VLImageProcessor`` (the class Qwen2.5-VL's processor uses) followed by
``Qwen2_5_VLForConditionalGeneration``'s ``get_image_features``: the same sizes as Qwen2-VL (patch 14,
merge 2, the released budget 3136 / 12845056 by default), the tower's tokens in raster order. Options as
``qwen2_vl``.

Example::

    >>> import torch, hrperc
    >>> from transformers import Qwen2_5_VLVisionConfig
    >>> from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    >>> config = Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48)
    >>> enc = hrperc.create_encoder("qwen2_5_vl", Qwen2_5_VisionTransformerPretrainedModel(config).eval())
    >>> out = enc([torch.randint(0, 256, (3, 300, 200), dtype=torch.uint8), torch.rand(3, 60, 90)])
    >>> out.tokens.shape, out.num_tokens
    (torch.Size([2, 77, 48]), [77, 6])
"""

from __future__ import annotations

from ..ops import native
from . import register_recipe
from .qwen2_vl import build_native, qwen_spec

__all__ = ["build_qwen2_5_vl"]


@register_recipe("qwen2_5_vl", **qwen_spec(native.QWEN2_VL_BUDGET))
def build_qwen2_5_vl(backbone, **options):
    """Qwen2.5-VL's front end around its vision tower (see :mod:`hrperc.recipes.qwen2_vl` for the options)."""
    return build_native("qwen2_5_vl", backbone, options)
