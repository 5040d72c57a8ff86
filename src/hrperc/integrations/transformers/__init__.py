"""hrperc as the image path of a transformers vision-language model: reproduce it, then upgrade it.

Seven model classes (and their ``*Model`` bases): ``LlavaForConditionalGeneration``,
``LlavaNextForConditionalGeneration``, ``LlavaOnevisionForConditionalGeneration``,
``InternVLForConditionalGeneration``, and the native-resolution ``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``, one entry each in the family
table (:mod:`._families`: a new family is an entry there plus its recipe). Three calls
(``docs/transformers.md`` has the walk-through):

* :func:`encoder_from_model` -- the :class:`~hrperc.HighResEncoder` of the model's own front end (the
  recipe of its family, its vision tower shared, its layer, CLS, pinpoints, tiling and normalization);
* :func:`attach` -- the model and a processor that run a given encoder as the model's image path:
  ``model(**processor(images=..., text=..., return_tensors="pt"))`` and ``model.generate(...)``;
* :func:`save_front_end` / :func:`load_front_end` -- the trained front-end weights (a DEM, a new
  projector) in safetensors next to the model's ``save_pretrained`` output, and the attached model
  restored from the two.

How an attached model runs. The processor returned by :func:`attach` tokenizes the text with the
original processor's tokenizer and expands each image placeholder to ``encoder.num_tokens((H, W))``
tokens (InternVL: inside ``<img>`` / ``</img>``). It does not resample the images: ``pixel_values`` holds
the images themselves, each behind a header row that says what it is -- an exact integer pattern no
image holds, its size, and the image options the processor honoured -- ``(B, 3, 1 + H_max, W)`` int16
(uint8 values) or float32 (``[0, 1]`` values), plus ``image_sizes`` (:func:`pack_images`; the format
is in :mod:`hrperc.integrations.transformers._pixels`) -- for Qwen, ``image_grid_thw`` from the
encoder's plans and ``mm_token_type_ids``, so that the model's M-RoPE reads the grid the encoder ran.
The model's ``get_image_features`` is replaced (on this model object only) by the encoder:
``encoder(images, project=projector, newline=image_newline)``, whose tokens fill the placeholders as
the model's own features did; it refuses any ``pixel_values`` without the header (the original
processor's among them). Everything else -- the LLM, labels,
attention masks, the KV cache, ``generate`` -- is the unmodified model's code.

Example::

    >>> from hrperc.integrations.transformers import FAMILIES, pack_images, unpack_images
    >>> FAMILIES["llava_next"]                       # the recipe that reproduces a model_type's image path
    'llava_next'
    >>> import torch
    >>> px, sizes = pack_images([torch.rand(3, 40, 30)])
    >>> px.shape, sizes.tolist(), unpack_images(px)[0].shape
    (torch.Size([1, 3, 41, 30]), [[40, 30]], torch.Size([3, 40, 30]))
    >>> model, proc = attach(model, processor, encoder_from_model(model, processor)) # doctest: +SKIP
    >>> out = model.generate(**proc(images=image, text=prompt, return_tensors="pt")) # doctest: +SKIP
"""

from __future__ import annotations

from ._attach import AttachedProcessor, attach
from ._families import FAMILIES
from ._model import encoder_from_model
from ._pixels import pack_images, unpack_images
from ._save import load_front_end, save_front_end

__all__ = [
    "encoder_from_model",
    "attach",
    "AttachedProcessor",
    "pack_images",
    "unpack_images",
    "save_front_end",
    "load_front_end",
    "FAMILIES",
]
