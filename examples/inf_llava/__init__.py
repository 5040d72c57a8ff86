"""INF-LLaVA with a LLaMA-3 LLM: a transformers ``LlavaForConditionalGeneration`` with hrperc's INF-LLaVA front
end attached; configs, synthetic data, training, generation.

Put ``examples/`` on ``sys.path`` (the scripts do it themselves) and ``import inf_llava``::

    >>> from inf_llava import get_config, build_tokenizer, build_inf_llava
    >>> cfg = get_config("tiny")
    >>> model = build_inf_llava(cfg, build_tokenizer(cfg))
"""

from .configs import CONFIGS, LLAMA3_IMAGE_TOKEN, InfLlavaConfig, build_tokenizer, get_config
from .model import (
    IGNORE_INDEX,
    build_inf_llava,
    encoder_of,
    llm_parts,
    model_num_tokens,
    set_stage,
    token_loss_sum,
)

__all__ = [
    "CONFIGS",
    "LLAMA3_IMAGE_TOKEN",
    "IGNORE_INDEX",
    "InfLlavaConfig",
    "build_tokenizer",
    "get_config",
    "build_inf_llava",
    "encoder_of",
    "llm_parts",
    "model_num_tokens",
    "set_stage",
    "token_loss_sum",
]
