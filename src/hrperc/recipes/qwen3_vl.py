"""``qwen3_vl``: Qwen3-VL's native-resolution front end -- Qwen2-VL's (:mod:`hrperc.recipes.qwen2_vl`) on a
Qwen3-VL tower: 16-pixel patches merged 2 x 2 (one token per 32 x 32 pixels), the released budget
65536 / 16777216 and mean = std = 0.5 by default (transformers' image-processor class defaults to CLIP's
normalization and 3136 / 1003520: a processor loaded from a Qwen3-VL checkpoint carries the released values).

The tower also hands the LLM features of intermediate blocks ("deepstack"): ``EncoderOutput.extras``
holds them as ``"deepstack.0"``, ``"deepstack.1"``, ..., each shaped like ``tokens`` (the model adds level
``k`` to the output of its LLM layer ``k`` at the image positions). Options as ``qwen2_vl``.

Example::

    >>> import torch, hrperc
    >>> from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    >>> from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel
    >>> config = Qwen3VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48,
    ...                              num_position_embeddings=64, deepstack_visual_indexes=[0])
    >>> enc = hrperc.create_encoder("qwen3_vl", Qwen3VLVisionModel(config).eval())
    >>> out = enc(torch.rand(3, 300, 200))
    >>> enc.num_tokens((300, 200)), out.tokens.shape, sorted(out.extras), out.extras["deepstack.0"].shape
    (70, torch.Size([1, 70, 48]), ['deepstack.0'], torch.Size([1, 70, 48]))
"""

from __future__ import annotations

from ..ops import native
from . import register_recipe
from .qwen2_vl import build_native, qwen_spec

__all__ = ["build_qwen3_vl"]


@register_recipe("qwen3_vl", **qwen_spec(native.QWEN3_VL_BUDGET))
def build_qwen3_vl(backbone, **options):
    """Qwen3-VL's front end around its vision tower (see :mod:`hrperc.recipes.qwen2_vl` for the options)."""
    return build_native("qwen3_vl", backbone, options)
