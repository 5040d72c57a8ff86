"""LLaVA-OneVision in vLLM with hrperc's front end (``docs/serving.md``); imported by vLLM, never by hrperc.

:class:`HrpercLlavaOnevisionForConditionalGeneration` is vLLM's ``LlavaOnevisionForConditionalGeneration``
(images and videos) for a directory without front-end files; with them, the image path of :mod:`._common`:
each image of a prompt -- one or several -- is expanded to the encoder's ``num_tokens`` of the image and
encoded by the restored front end, as vLLM's own class encodes every image of a prompt with ``anyres_max_9``.

Videos are refused with front-end files, naming the plugin and the fix: OneVision's video path (every frame
at the tile's size, pooled 2 x 2) is not the front end's, and the attached transformers model does not take
videos either, so there is nothing served videos could be checked against.
"""

from __future__ import annotations

from collections.abc import Mapping

from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import BaseMultiModalProcessor

from . import has_front_end
from ._common import FrontEndInfo, FrontEndModel, FrontEndProcessor, model_dir

__all__ = [
    "HrpercLlavaOnevisionForConditionalGeneration",
    "HrpercLlavaOnevisionProcessingInfo",
    "HrpercLlavaOnevisionMultiModalProcessor",
]


def _no_videos(directory: str, count: int) -> ValueError:
    return ValueError(
        f"the request holds {count} video(s), but {directory!r} holds hrperc's front-end files: hrperc's vLLM "
        f"plugin serves LLaVA-OneVision's images through the front end and does not serve videos (OneVision's "
        f"video path is not the front end's). Send images, or serve videos from a copy of the checkpoint "
        f"without hrperc_front_end.json / hrperc_front_end.safetensors (vLLM's own OneVision)."
    )


class HrpercLlavaOnevisionProcessingInfo(FrontEndInfo, LlavaOnevisionProcessingInfo):
    """LLaVA-OneVision's processing info with the front end's counts; images only (no video modality)."""

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}  # no "video": vLLM neither profiles nor accepts videos

    def validate_num_items(self, modality: str, num_items: int) -> None:
        if modality == "video" and num_items > 0:
            raise _no_videos(model_dir(self.ctx.model_config), num_items)  # type: ignore[attr-defined]
        super().validate_num_items(modality, num_items)


class HrpercLlavaOnevisionMultiModalProcessor(FrontEndProcessor, LlavaOnevisionMultiModalProcessor):
    """LLaVA-OneVision's processor with the front end's packed images."""

    info: HrpercLlavaOnevisionProcessingInfo

    def _get_hf_mm_text(self, mm_counts: Mapping[str, int]):
        # The attached processor packs the images alone; vLLM writes each image's placeholders itself (the
        # encoder's count), so no text reaches the processor, which refuses OneVision texts with several images.
        return None

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        videos = mm_items.get_count("video", strict=False)
        if videos:  # validate_num_items refuses them first; this guards callers that skip validation
            raise _no_videos(model_dir(self.info.ctx.model_config), videos)
        # BaseMultiModalProcessor's: OneVision's own splits the prompt text for its video path
        return BaseMultiModalProcessor._apply_hf_processor_main(self, mm_items, hf_kwargs)


def _info(ctx):
    cls = (
        HrpercLlavaOnevisionProcessingInfo
        if has_front_end(model_dir(ctx.model_config))
        else LlavaOnevisionProcessingInfo
    )
    return cls(ctx)


def _processor(info, dummy_inputs, **kwargs):
    if isinstance(info, HrpercLlavaOnevisionProcessingInfo):
        return HrpercLlavaOnevisionMultiModalProcessor(info, dummy_inputs, **kwargs)
    return LlavaOnevisionMultiModalProcessor(info, dummy_inputs, **kwargs)


@MULTIMODAL_REGISTRY.register_processor(_processor, info=_info, dummy_inputs=LlavaOnevisionDummyInputsBuilder)
class HrpercLlavaOnevisionForConditionalGeneration(FrontEndModel, LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision; with hrperc's front-end files in the model directory, hrperc's image path."""
