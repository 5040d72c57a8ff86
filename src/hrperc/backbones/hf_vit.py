"""Hugging Face ``CLIPVisionModel`` and ``SiglipVisionModel`` (or the full CLIP/SigLIP models) as a backbone.

Layer ``k`` is ``hidden_states[k]`` of the model's own forward (``hidden_states[0]`` being the
embeddings), prefix tokens dropped: CLIP has one class token, SigLIP none; the count is read off the
embeddings (``num_positions - num_patches``). The adapter runs the model's own modules in the model's
order -- ``embeddings``, CLIP's ``pre_layrnorm``, then only the first ``k`` entries of
``encoder.layers`` -- instead of the full forward with ``output_hidden_states=True``: the later blocks,
the final norm and SigLIP's pooling head never run and no other layer's activations are kept, with or
without gradient checkpointing (the layers checkpoint themselves in transformers >= 4.52, where they
are ``GradientCheckpointingLayer``; for older layers the adapter wraps each call in
``torch.utils.checkpoint`` as the encoder would). Mean/std come from ``preprocessor_config.json`` when
loaded from a directory.

Example::

    >>> import torch, hrperc
    >>> from transformers import CLIPVisionConfig, CLIPVisionModel
    >>> cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                        num_attention_heads=2, image_size=28, patch_size=14)
    >>> bb = hrperc.backbones.HFBackbone(CLIPVisionModel(cfg))
    >>> bb.num_prefix_tokens, bb.features(torch.randn(2, 3, 28, 28)).shape
    (1, torch.Size([2, 4, 32]))
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VisionBackbone

__all__ = ["HFBackbone", "hf_vision_transformer"]

_SUPPORTED = (
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "CLIPModel",
    "SiglipVisionModel",
    "SiglipModel",
)


def hf_vision_transformer(model):
    """The module holding ``embeddings`` + ``encoder`` of a supported transformers model, else ``None``."""
    name = type(model).__name__
    if name not in _SUPPORTED and name not in ("CLIPVisionTransformer", "SiglipVisionTransformer"):
        return None
    # transformers 4.x nests the tower in ``vision_model``; 5.x flattens it into the model itself.
    vision = getattr(model, "vision_model", model)
    if not (hasattr(vision, "embeddings") and hasattr(vision, "encoder")):
        return None
    return vision


def _is_self_checkpointing(layer) -> bool:
    """True for transformers' ``GradientCheckpointingLayer`` (>= 4.52), which checkpoints its own call."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: the encoder's loop did the checkpointing
        return False
    return isinstance(layer, GradientCheckpointingLayer)


_NEEDS_CAUSAL_MASK: dict[type, bool] = {}


def _call_layer(layer, hidden: torch.Tensor) -> torch.Tensor:
    """One encoder layer on ``hidden`` with no attention mask, across transformers versions: 4.x CLIP
    layers take a positional ``causal_attention_mask`` and return a tuple, 5.x ones a tensor."""
    cls = type(layer)
    if cls not in _NEEDS_CAUSAL_MASK:
        _NEEDS_CAUSAL_MASK[cls] = "causal_attention_mask" in inspect.signature(cls.forward).parameters
    out = layer(hidden, None, None) if _NEEDS_CAUSAL_MASK[cls] else layer(hidden, None)
    return out[0] if isinstance(out, tuple) else out


class HFBackbone(VisionBackbone):
    """Adapter for transformers CLIP / SigLIP vision towers (see module docs)."""

    family = "hf"

    def __init__(
        self, model: nn.Module, layer: int = -2, mean=None, std=None, source: str | None = None
    ) -> None:
        vision = hf_vision_transformer(model)
        if vision is None:
            raise TypeError(
                f"HFBackbone: {type(model).__name__} is not supported; pass one of {', '.join(_SUPPORTED)}. "
                f"Other ViTs: wrap a timm or open_clip model instead."
            )
        cfg = vision.config
        emb = vision.embeddings
        siglip = "Siglip" in type(vision).__name__
        default_mean, default_std = (
            ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) if siglip else (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        )
        super().__init__(
            vision,
            image_size=(cfg.image_size, cfg.image_size),
            patch_size=(cfg.patch_size, cfg.patch_size),
            hidden_size=cfg.hidden_size,
            num_layers=len(vision.encoder.layers),
            num_prefix_tokens=emb.num_positions - emb.num_patches,
            mean=default_mean if mean is None else mean,
            std=default_std if std is None else std,
            layer=layer,
            source=source,
        )

    def _set_grad_checkpointing(self, enable: bool) -> None:
        # What PreTrainedModel.gradient_checkpointing_enable does, applied to the vision tower only.
        from functools import partial

        from torch.utils.checkpoint import checkpoint

        for module in self.model.modules():
            if hasattr(module, "gradient_checkpointing"):
                module._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
                module.gradient_checkpointing = enable

    def _patch_tokens(self, pixels: torch.Tensor, k: int) -> torch.Tensor:
        vision = self.model
        hidden = vision.embeddings(pixels)
        pre_norm = getattr(vision, "pre_layrnorm", None)  # CLIP (sic); SigLIP has no pre-norm
        if pre_norm is not None:
            hidden = pre_norm(hidden)
        encoder = vision.encoder
        # Checkpointing as the model's own forward would do it: only in training mode, with grad on.
        outer_ckpt = bool(getattr(encoder, "gradient_checkpointing", False)) and encoder.training
        outer_ckpt = outer_ckpt and torch.is_grad_enabled()
        for layer in encoder.layers[:k]:  # blocks after k (and the final norm, SigLIP's head) never run
            if outer_ckpt and not _is_self_checkpointing(layer):
                from torch.utils.checkpoint import checkpoint

                hidden = checkpoint(_call_layer, layer, hidden, use_reentrant=False)
            else:
                hidden = _call_layer(layer, hidden)
        return hidden[:, self.num_prefix_tokens :]
