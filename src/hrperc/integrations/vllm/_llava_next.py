"""LLaVA-NeXT in vLLM with hrperc's front end (``docs/serving.md``); imported by vLLM, never by hrperc.

:class:`HrpercLlavaNextForConditionalGeneration` is vLLM's ``LlavaNextForConditionalGeneration`` for a
directory without front-end files; with them, the image path of :mod:`._common`: the processor expands each
image placeholder to the encoder's ``num_tokens`` of the image and hands the images on packed, unresized;
the model runs the restored front end on them and vLLM's LLM takes the features.
"""

from __future__ import annotations

from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from . import has_front_end
from ._common import FrontEndInfo, FrontEndModel, FrontEndProcessor, model_dir

__all__ = [
    "HrpercLlavaNextForConditionalGeneration",
    "HrpercLlavaNextProcessingInfo",
    "HrpercLlavaNextMultiModalProcessor",
]


class HrpercLlavaNextProcessingInfo(FrontEndInfo, LlavaNextProcessingInfo):
    """LLaVA-NeXT's processing info with the front end's counts."""


class HrpercLlavaNextMultiModalProcessor(FrontEndProcessor, LlavaNextMultiModalProcessor):
    """LLaVA-NeXT's processor with the front end's packed images."""


def _info(ctx):
    cls = HrpercLlavaNextProcessingInfo if has_front_end(model_dir(ctx.model_config)) else LlavaNextProcessingInfo
    return cls(ctx)


def _processor(info, dummy_inputs, **kwargs):
    if isinstance(info, HrpercLlavaNextProcessingInfo):
        return HrpercLlavaNextMultiModalProcessor(info, dummy_inputs, **kwargs)
    return LlavaNextMultiModalProcessor(info, dummy_inputs, **kwargs)


@MULTIMODAL_REGISTRY.register_processor(_processor, info=_info, dummy_inputs=LlavaDummyInputsBuilder)
class HrpercLlavaNextForConditionalGeneration(FrontEndModel, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT; with hrperc's front-end files in the model directory, hrperc's image path."""
