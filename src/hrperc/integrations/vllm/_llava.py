"""LLaVA-1.5 in vLLM with hrperc's front end (``docs/serving.md``); imported by vLLM, never by hrperc.

:class:`HrpercLlavaForConditionalGeneration` is vLLM's ``LlavaForConditionalGeneration`` (Pixtral towers
included) for a directory without front-end files; with them, the image path of :mod:`._common`.
"""

from __future__ import annotations

from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from . import has_front_end
from ._common import FrontEndInfo, FrontEndModel, FrontEndProcessor, model_dir

__all__ = ["HrpercLlavaForConditionalGeneration", "HrpercLlavaProcessingInfo", "HrpercLlavaMultiModalProcessor"]


class HrpercLlavaProcessingInfo(FrontEndInfo, LlavaProcessingInfo):
    """LLaVA-1.5's processing info with the front end's counts."""


class HrpercLlavaMultiModalProcessor(FrontEndProcessor, LlavaMultiModalProcessor):
    """LLaVA-1.5's processor with the front end's packed images."""


def _info(ctx):
    if not has_front_end(model_dir(ctx.model_config)):
        return _build_llava_or_pixtral_hf_info(ctx)
    vision = getattr(ctx.get_hf_config(), "vision_config", None)
    if getattr(vision, "model_type", None) == "pixtral":
        raise ValueError(
            f"{model_dir(ctx.model_config)!r} holds hrperc's front-end files for a LLaVA with a Pixtral tower, "
            f"which hrperc's vLLM plugin does not serve yet (docs/serving.md lists the supported families). "
            f"Serve it with transformers (load_front_end), or remove the files to serve the original model."
        )
    return HrpercLlavaProcessingInfo(ctx)


def _processor(info, dummy_inputs, **kwargs):
    if isinstance(info, HrpercLlavaProcessingInfo):
        return HrpercLlavaMultiModalProcessor(info, dummy_inputs, **kwargs)
    return _build_llava_or_pixtral_hf_processor(info, dummy_inputs, **kwargs)


@MULTIMODAL_REGISTRY.register_processor(_processor, info=_info, dummy_inputs=LlavaDummyInputsBuilder)
class HrpercLlavaForConditionalGeneration(FrontEndModel, LlavaForConditionalGeneration):
    """vLLM's LLaVA; with hrperc's front-end files in the model directory, hrperc's image path."""
