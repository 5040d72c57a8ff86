"""LLaVA-NeXT in vLLM with hrperc's front end (``docs/serving.md``); imported by vLLM, never by hrperc.

:class:`HrpercLlavaNextForConditionalGeneration` is vLLM's ``LlavaNextForConditionalGeneration`` for a
directory without front-end files. With them, its image path is the attached transformers model's
(:mod:`._shell`): the processor expands each image placeholder to the encoder's ``num_tokens`` of the image
and hands the images on packed (:func:`~hrperc.integrations.transformers.pack_images`), unresized; the model
runs the restored front end on them and vLLM's LLM takes the features.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cached_property

import torch
import torch.nn.functional as F
from transformers import BatchFeature
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.utils import AutoWeightsLoader
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageSize

from . import FRONT_END_FILES, has_front_end
from ._shell import IMAGE_PARTS, load_image_weights, restore

__all__ = [
    "HrpercLlavaNextForConditionalGeneration",
    "HrpercLlavaNextProcessingInfo",
    "HrpercLlavaNextMultiModalProcessor",
]

_PAD = -1  # the packed format's padding value (hrperc.integrations.transformers._pixels)


def _model_dir(model_config) -> str:
    return str(model_config.model)


class HrpercLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    """Counts from the restored encoder (on ``meta``: no weights are made): ``get_num_image_tokens`` is its
    ``num_tokens``, the largest image its largest count over the pinpoints."""

    @cached_property
    def attached(self):
        """The attached processor of the directory's front end (its ``encoder`` counts the tokens)."""
        _, attached = restore(
            self.get_hf_config(), self.get_hf_processor(), _model_dir(self.ctx.model_config), real=False
        )
        return attached

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return int(self.attached.encoder.num_tokens((image_height, image_width)))

    def get_image_size_with_most_features(self) -> ImageSize:
        sizes = [(h, w) for h, w in self.get_hf_config().image_grid_pinpoints]
        h, w = max(sizes, key=lambda s: self.get_num_image_tokens(image_width=s[1], image_height=s[0]))
        return ImageSize(width=w, height=h)


class HrpercLlavaNextMultiModalProcessor(LlavaNextMultiModalProcessor):
    """The attached processor's ``pixel_values`` (the images packed, unresized) and ``image_sizes``."""

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        out = self.info.attached(**hf_data, **hf_kwargs, return_tensors="pt")
        return BatchFeature({"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]})

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        return dict(
            pixel_values=MultiModalFieldConfig.batched("image"),
            image_sizes=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        )


def _info(ctx):
    cls = HrpercLlavaNextProcessingInfo if has_front_end(_model_dir(ctx.model_config)) else LlavaNextProcessingInfo
    return cls(ctx)


def _processor(info, dummy_inputs, **kwargs):
    cls = (
        HrpercLlavaNextMultiModalProcessor
        if isinstance(info, HrpercLlavaNextProcessingInfo)
        else LlavaNextMultiModalProcessor
    )
    return cls(info, dummy_inputs, **kwargs)


def _repacked(pixel_values) -> torch.Tensor:
    """One packed ``(B, 3, 1 + H_max, W_max)`` tensor from vLLM's batch of packed images: a tensor as it is,
    a list (images of different packed sizes) padded right and bottom, which the format allows."""
    if isinstance(pixel_values, torch.Tensor):
        return pixel_values
    h = max(int(p.shape[-2]) for p in pixel_values)
    w = max(int(p.shape[-1]) for p in pixel_values)
    return torch.stack([F.pad(p, (0, w - p.shape[-1], 0, h - p.shape[-2]), value=_PAD) for p in pixel_values])


@MULTIMODAL_REGISTRY.register_processor(_processor, info=_info, dummy_inputs=LlavaDummyInputsBuilder)
class HrpercLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT; with hrperc's front-end files in the model directory, hrperc's image path."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        model_config = vllm_config.model_config
        directory = _model_dir(model_config)
        self._hrperc_shell = None
        if not has_front_end(directory):
            return
        device = next(self.language_model.parameters()).device
        # Plain attributes: vLLM's loader checks every registered parameter against the checkpoint's.
        shell, _ = restore(model_config.hf_config, None, directory, real=True, dtype=model_config.dtype, device=device)
        object.__setattr__(self, "_hrperc_shell", shell)
        from safetensors import safe_open

        with safe_open(str(directory) + "/" + FRONT_END_FILES[1], "pt") as f:
            object.__setattr__(self, "_hrperc_file_keys", frozenset(f.keys()))
        # vLLM's own image parts are not used: the shell holds the checkpoint's.
        self.vision_tower = None
        self.multi_modal_projector = None
        self.image_newline = None

    def embed_multimodal(self, **kwargs):
        if self._hrperc_shell is None:
            return super().embed_multimodal(**kwargs)
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        sizes = kwargs.get("image_sizes")
        sizes = torch.stack(list(sizes)) if isinstance(sizes, (list, tuple)) else sizes
        out = self._hrperc_shell.model.get_image_features(_repacked(pixel_values), image_sizes=sizes)
        return list(out.pooler_output)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self._hrperc_shell is None:
            return super().load_weights(weights)
        image: dict[str, torch.Tensor] = {}

        def language():
            for name, tensor in weights:
                if name in self._hrperc_file_keys:  # hrperc's own file, read by vLLM with the model's
                    continue
                short = name.removeprefix("model.")
                if short.startswith(IMAGE_PARTS):
                    image[short] = tensor
                else:
                    yield name, tensor

        loaded = AutoWeightsLoader(self).load_weights(language(), mapper=self.hf_to_vllm_mapper)
        load_image_weights(self._hrperc_shell, image)
        return loaded
