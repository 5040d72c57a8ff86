"""What every family's plugin class shares (``docs/serving.md``): mixins put before vLLM's own classes.

* :class:`FrontEndInfo` -- counts from the restored encoder (on ``meta``: no weights are made):
  ``get_num_image_tokens`` is its ``num_tokens``, the largest image the one of the most tokens among the
  pinpoints (the tower's tile for a family without pinpoints);
* :class:`FrontEndProcessor` -- the attached processor's ``pixel_values`` (the images packed, unresized)
  and ``image_sizes``;
* :class:`FrontEndModel` -- the restored image path (:mod:`._shell`) in place of vLLM's tower and
  projector, hrperc's weight file skipped by vLLM's loader. Without front-end files the class is vLLM's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cached_property

import torch
import torch.nn.functional as F

from . import FRONT_END_FILES, has_front_end
from ._shell import IMAGE_PARTS, load_image_weights, restore

__all__ = ["FrontEndInfo", "FrontEndProcessor", "FrontEndModel", "model_dir"]

_PAD = -1  # the packed format's padding value (hrperc.integrations.transformers._pixels)


def model_dir(model_config) -> str:
    return str(model_config.model)


class FrontEndInfo:
    """A vLLM ``BaseProcessingInfo`` mixin: the counts of the directory's front end."""

    ctx: object

    @cached_property
    def attached(self):
        """The attached processor of the directory's front end (its ``encoder`` counts the tokens)."""
        config, processor = self.get_hf_config(), self.get_hf_processor()
        _, attached = restore(config, processor, model_dir(self.ctx.model_config), real=False)
        return attached

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return int(self.attached.encoder.num_tokens((image_height, image_width)))

    def get_image_size_with_most_features(self):
        from vllm.multimodal.parse import ImageSize

        sizes = [tuple(p) for p in getattr(self.get_hf_config(), "image_grid_pinpoints", None) or []]
        if not sizes:
            tile = self.get_vision_encoder_info().get_image_size()
            sizes = [(tile, tile)]
        h, w = max(sizes, key=lambda s: self.get_num_image_tokens(image_width=s[1], image_height=s[0]))
        return ImageSize(width=w, height=h)


class FrontEndProcessor:
    """A vLLM ``BaseMultiModalProcessor`` mixin: the attached processor's packed images."""

    info: FrontEndInfo

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]):
        from transformers import BatchFeature

        out = self.info.attached(**hf_data, **hf_kwargs, return_tensors="pt")
        return BatchFeature({"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]})

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        from vllm.multimodal.inputs import MultiModalFieldConfig

        return dict(
            pixel_values=MultiModalFieldConfig.batched("image"),
            image_sizes=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        )


def repacked(pixel_values) -> torch.Tensor:
    """One packed ``(B, 3, 1 + H_max, W_max)`` tensor from vLLM's batch of packed images: a tensor as it is,
    a list (images of different packed sizes) padded right and bottom, which the format allows."""
    if isinstance(pixel_values, torch.Tensor):
        return pixel_values
    h = max(int(p.shape[-2]) for p in pixel_values)
    w = max(int(p.shape[-1]) for p in pixel_values)
    return torch.stack([F.pad(p, (0, w - p.shape[-1], 0, h - p.shape[-2]), value=_PAD) for p in pixel_values])


class FrontEndModel:
    """A vLLM LLaVA-family model mixin: with front-end files in the directory, hrperc's image path."""

    _hrperc_shell = None

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        model_config = vllm_config.model_config
        directory = model_dir(model_config)
        if not has_front_end(directory):
            return
        device = next(self.language_model.parameters()).device  # type: ignore[attr-defined]
        # Plain attributes: vLLM's loader checks every registered parameter against the checkpoint's.
        shell, _ = restore(model_config.hf_config, None, directory, real=True, dtype=model_config.dtype, device=device)
        object.__setattr__(self, "_hrperc_shell", shell)
        from safetensors import safe_open

        with safe_open(f"{directory}/{FRONT_END_FILES[1]}", "pt") as f:
            object.__setattr__(self, "_hrperc_file_keys", frozenset(f.keys()))
        for part in IMAGE_PARTS:  # vLLM's own image parts are not used: the shell holds the checkpoint's
            if hasattr(self, part):
                setattr(self, part, None)

    def embed_multimodal(self, **kwargs):
        if self._hrperc_shell is None:
            return super().embed_multimodal(**kwargs)
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        sizes = kwargs.get("image_sizes")
        sizes = torch.stack(list(sizes)) if isinstance(sizes, (list, tuple)) else sizes
        out = self._hrperc_shell.model.get_image_features(repacked(pixel_values), image_sizes=sizes)
        return list(out.pooler_output)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self._hrperc_shell is None:
            return super().load_weights(weights)  # type: ignore[misc]
        from vllm.model_executor.models.utils import AutoWeightsLoader

        image: dict[str, torch.Tensor] = {}
        skip = self._hrperc_file_keys

        def language():
            for name, tensor in weights:
                if name in skip:  # hrperc's own file, read by vLLM with the model's
                    continue
                short = name.removeprefix("model.")
                if short.startswith(IMAGE_PARTS):
                    image[short] = tensor
                else:
                    yield name, tensor

        loaded = AutoWeightsLoader(self).load_weights(language(), mapper=self.hf_to_vllm_mapper)
        load_image_weights(self._hrperc_shell, image)
        return loaded
