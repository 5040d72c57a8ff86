"""INF-LLaVA with a LLaMA-3 LLM (transformers): model, configs, synthetic data, training, generation.

Put ``examples/`` on ``sys.path`` (the scripts do it themselves) and ``import inf_llava``::

    >>> from inf_llava import get_config, build_tokenizer, build_inf_llava
    >>> cfg = get_config("tiny")
    >>> model = build_inf_llava(cfg, build_tokenizer(cfg))
"""

from .configs import CONFIGS, IMAGE_TOKEN_INDEX, InfLlavaConfig, build_tokenizer, get_config
from .model import (
    IGNORE_INDEX,
    InfLlava,
    InfLlavaOutput,
    MergedInputs,
    build_inf_llava,
    merge_visual_tokens,
    merge_visual_tokens_reference,
)

__all__ = [
    "CONFIGS",
    "IMAGE_TOKEN_INDEX",
    "IGNORE_INDEX",
    "InfLlavaConfig",
    "build_tokenizer",
    "get_config",
    "InfLlava",
    "InfLlavaOutput",
    "MergedInputs",
    "build_inf_llava",
    "merge_visual_tokens",
    "merge_visual_tokens_reference",
]
