"""What every family's plugin class shares (``docs/serving.md``): mixins put before vLLM's own classes.

* :class:`FrontEndInfo` -- counts from the restored encoder (on ``meta``: no weights are made):
  ``get_num_image_tokens`` is its ``num_tokens``, the largest image the one of the most tokens among the
  pinpoints and the images of each pinpoint's full height or width (the tower's tile for a family without
  pinpoints), which vLLM's memory profiling and encoder cache are sized by;
* :class:`FrontEndProcessor` -- the attached processor's ``pixel_values`` (the images packed, unresized)
  and ``image_sizes``; a request with more or fewer images than placeholders, or too long for ``max_model_len``
  with its images' tokens, refused before vLLM processes (and caches) its images;
* :class:`FrontEndModel` -- the restored image path (:mod:`._shell`) in place of vLLM's tower and
  projector, hrperc's weight file skipped by vLLM's loader. Without front-end files the class is vLLM's.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F

from . import FRONT_END_FILES, has_front_end
from ._shell import IMAGE_PARTS, load_image_weights, restore

__all__ = ["FrontEndInfo", "FrontEndProcessor", "FrontEndModel", "model_dir"]

_PAD = -1  # the packed format's padding value (hrperc.integrations.transformers._pixels)
_PROFILING = threading.local()  # set while vLLM processes its own dummy inputs (FrontEndProcessor)


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

        key = (model_dir(self.ctx.model_config), _files_stamp(model_dir(self.ctx.model_config)))
        if key not in _MOST:  # vLLM builds its processing info several times per engine
            encoder = self.attached.encoder
            pinpoints = [tuple(p) for p in getattr(self.get_hf_config(), "image_grid_pinpoints", None) or []]
            vision = self.get_vision_encoder_info()
            tile = vision.get_image_size()
            step = max(1, vision.get_patch_size() // 2)
            _MOST[key] = max(_candidates(pinpoints, tile, step), key=encoder.num_tokens)
        h, w = _MOST[key]
        return ImageSize(width=w, height=h)


# (directory, its front-end files' stamp) -> the (H, W) of the most tokens found by _candidates
_MOST: dict[tuple, tuple[int, int]] = {}


def _files_stamp(directory: str) -> tuple:
    stats = [Path(directory, name).stat() for name in FRONT_END_FILES if Path(directory, name).is_file()]
    return tuple((s.st_mtime_ns, s.st_size) for s in stats)


def _candidates(pinpoints, tile: int, step: int) -> list[tuple[int, int]]:
    """The image sizes searched for the most tokens: each pinpoint canvas (the tile without pinpoints), and
    the images of the canvas's full height (width) and every width (height) at ``step`` pixels, which the
    canvas holds unscaled: the unpadded maps of one full side, OneVision's map just under its ``anyres_max_N``
    shrink among them (more tokens than any pinpoint: a pinpoint's own map is shrunk). A search, not a
    proof: ``tests_vllm/test_counts.py`` checks it against every third size up to 400 px on the tiny models
    (OneVision's 384 px geometry: the same most, 8765, as 150000 random sizes up to 2600 px)."""
    out = []
    for ch, cw in pinpoints or [(tile, tile)]:
        out.append((ch, cw))
        out += [(ch, w) for w in range(step, cw, step)] + [(h, cw) for h in range(step, ch, step)]
    return out


class FrontEndProcessor:
    """A vLLM ``BaseMultiModalProcessor`` mixin: the attached processor's packed images, and a request's images
    checked against its prompt before they are processed (see :meth:`apply`)."""

    info: FrontEndInfo

    def apply(self, inputs, timing_ctx):
        """vLLM's ``apply``, after :meth:`check_request` (not for vLLM's own dummy inputs: profiling, warmup)."""
        if not getattr(_PROFILING, "on", False):
            self.check_request(inputs.prompt, inputs.mm_data_items)
        return super().apply(inputs, timing_ctx)

    def get_dummy_mm_inputs(self, *args, **kwargs):
        _PROFILING.on = True
        try:
            return super().get_dummy_mm_inputs(*args, **kwargs)
        finally:
            _PROFILING.on = False

    def check_request(self, prompt: list[int], mm_items) -> None:
        """Refuse, naming the values, a request with more (or fewer) images than its prompt has placeholders, or whose
        prompt the images' tokens take past ``max_model_len``. vLLM refuses both later (the first with an
        ``AssertionError`` that names no count), after its processor cache took the images: a request that
        sends one of them again then fails with ``MultiModalCacheMissError``. Checked here, nothing is cached."""
        from vllm.multimodal.parse import ImageProcessorItems

        images = mm_items.get_count("image", strict=False)
        if not images:
            return
        token_id = self.info.get_hf_config().image_token_index  # type: ignore[attr-defined]
        token = self.info.attached.image_token
        placeholders = sum(1 for t in prompt if t == token_id)
        if images > placeholders:
            raise ValueError(
                f"the request has {images} image(s) but its prompt holds {placeholders} image placeholder(s) "
                f"{token!r}; write one {token!r} per image, where the image goes (hrperc's vLLM plugin)."
            )
        items = mm_items["image"]
        if not isinstance(items, ImageProcessorItems):  # embeddings: vLLM checks those itself
            return
        sizes = [items.get_image_size(i) for i in range(images)]
        counts = [self.info.get_num_image_tokens(image_width=s.width, image_height=s.height) for s in sizes]
        # Fewer images than placeholders: vLLM would serve the extra placeholders as text tokens, where
        # transformers refuses. A prompt whose placeholders are already expanded (sum(counts) of them) is fine.
        if placeholders > images and placeholders != sum(counts):
            raise ValueError(
                f"the request has {images} image(s) but its prompt holds {placeholders} image placeholder(s) "
                f"{token!r}; send one image per {token!r}, or remove the extra {token!r} (hrperc's vLLM plugin)."
            )
        total = len(prompt) - images + sum(counts)
        limit = self.info.ctx.model_config.max_model_len  # type: ignore[attr-defined]
        if total >= limit:  # vLLM's rule: the prompt and at least one generated token
            raise ValueError(
                f"the prompt takes {total} tokens with its images ({len(prompt) - images} of text; images of "
                f"{[(s.height, s.width) for s in sizes]} (H, W) take {counts}), and max_model_len is {limit} (one "
                f"more token must fit). Send smaller or fewer images, or serve with a larger --max-model-len "
                f"(hrperc's vLLM plugin)."
            )

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
