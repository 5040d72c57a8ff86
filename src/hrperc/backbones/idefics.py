"""The vision tower of Idefics3 and SmolVLM (``Idefics3VisionTransformer``, ``SmolVLMVisionTransformer``) as a
backbone: :class:`IdeficsBackbone`.

Both towers are SigLIP with NaViT-style position buckets (``Idefics3VisionEmbeddings``): a view is embedded
with a patch mask, and its patches take the position embedding of their fractional place in the view.
The processors always give the tower views of exactly its ``image_size`` (the tiles and the global image of
``max_image_size``), every patch real, so the adapter embeds each view with an all-true patch mask -- what
the models' ``get_image_features`` pass for such views -- and runs the tower's own modules in its order::

    views (N, 3, t, t), normalized --embeddings(pixels, all-true patch mask)--> (N, (t/p)**2, D)
          --encoder.layers[:k], no attention mask (every patch is real)--> block k's output
          --post_layernorm, only for the last block--> features

Layer ``-1`` (the default) is ``last_hidden_state``, the last block's output through the tower's
``post_layernorm``: what the models' ``get_image_features`` hand their connector. Any other layer ``k`` is
the output of block ``k`` (``hidden_states[k]``), without the final norm. There are no prefix tokens, and
mean / std default to SigLIP's 0.5 (the processors' ``IMAGENET_STANDARD_MEAN`` / ``_STD``).

Example::

    >>> import torch
    >>> from transformers import Idefics3VisionConfig
    >>> from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer
    >>> cfg = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                            num_attention_heads=2, image_size=56, patch_size=14)
    >>> from hrperc.backbones.idefics import IdeficsBackbone
    >>> bb = IdeficsBackbone(Idefics3VisionTransformer(cfg).eval())
    >>> bb.image_size, bb.grid_size, bb.layer, bb.features(bb.normalize(torch.rand(2, 3, 56, 56))).shape
    ((56, 56), (4, 4), -1, torch.Size([2, 16, 32]))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._errors import public
from .base import VisionBackbone, class_name

__all__ = ["IdeficsBackbone", "is_idefics_tower", "held_tower"]

_TOWERS = ("Idefics3VisionTransformer", "SmolVLMVisionTransformer")
_PARTS = ("embeddings", "encoder", "post_layernorm")


def is_idefics_tower(tower) -> bool:
    """Whether ``tower`` is an ``Idefics3VisionTransformer`` / ``SmolVLMVisionTransformer`` (or a subclass)
    with the parts this adapter runs (``embeddings``, ``encoder.layers``, ``post_layernorm``)."""
    named = any(cls.__name__ in _TOWERS for cls in type(tower).__mro__)
    return named and isinstance(tower, nn.Module) and all(hasattr(tower, a) for a in _PARTS)


def held_tower(model) -> str | None:
    """Where a full model holds its tower (``".model.vision_model"`` or ``".vision_model"``), else ``None``."""
    if not isinstance(model, nn.Module):
        return None
    for path in (("model", "vision_model"), ("vision_model",)):
        inner: Any = model
        for name in path:
            inner = getattr(inner, name, None)
        if inner is not None and is_idefics_tower(inner):
            return "." + ".".join(path)
    return None


class IdeficsBackbone(VisionBackbone):
    """An Idefics3 / SmolVLM vision tower as an hrperc backbone (see the module docs): views of its
    ``image_size``, layer ``-1`` = ``last_hidden_state`` (through ``post_layernorm``).

    Args:
        tower: ``model.model.vision_model`` of an ``Idefics3ForConditionalGeneration`` or
            ``SmolVLMForConditionalGeneration``.
        layer: the layer read, default -1 (what the models read).
        mean, std: per-channel normalization of ``[0, 1]`` RGB; ``None`` = 0.5 (the processors').
    """

    family = "idefics"

    @public(name=class_name())
    def __init__(self, tower, *, layer: int = -1, mean=None, std=None) -> None:
        if not is_idefics_tower(tower):
            where = held_tower(tower)
            hint = f" It holds one: pass its {where}." if where is not None else ""
            raise TypeError(
                f"tower={type(tower).__name__} is not an Idefics3 / SmolVLM vision tower.{hint} Pass "
                f"model.model.vision_model of an Idefics3ForConditionalGeneration or SmolVLMForConditionalGeneration."
            )
        if isinstance(layer, (list, tuple)):
            raise TypeError(
                f"layer={list(layer)!r}; this backbone reads one layer. Pass one int, e.g. layer=-1 (the models')."
            )
        config: Any = tower.config
        side, patch = int(config.image_size), int(config.patch_size)
        super().__init__(
            tower,
            image_size=(side, side),
            patch_size=(patch, patch),
            hidden_size=int(config.hidden_size),
            num_layers=len(tower.encoder.layers),
            num_prefix_tokens=0,
            mean=(0.5, 0.5, 0.5) if mean is None else mean,
            std=(0.5, 0.5, 0.5) if std is None else std,
            layer=layer,
        )

    def _set_grad_checkpointing(self, enable: bool) -> None:
        # The blocks are transformers' GradientCheckpointingLayer: the tower's own switch makes them checkpoint.
        tower = self.model
        if hasattr(tower, "activation_checkpointing_enable"):  # the newer name; the older one warns there
            if enable:
                tower.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                tower.activation_checkpointing_disable()
        elif enable:
            tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            tower.gradient_checkpointing_disable()

    def _patch_tokens(self, pixels: torch.Tensor, k: int) -> torch.Tensor:
        tower = self.model
        n, _, h, w = pixels.shape
        p = self.patch_size[0]
        mask = torch.ones(n, h // p, w // p, dtype=torch.bool, device=pixels.device)  # every patch is real
        hidden = tower.embeddings(pixel_values=pixels, patch_attention_mask=mask)
        for layer in tower.encoder.layers[:k]:
            hidden = layer(hidden, None)
        return tower.post_layernorm(hidden) if k == self.num_layers else hidden
