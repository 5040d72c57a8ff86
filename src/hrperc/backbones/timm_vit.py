"""timm ViTs (``VisionTransformer``, ``Eva``, ... anything with ``forward_intermediates``) as a backbone.

Tokens come from timm's own ``forward_intermediates(indices=[k-1], output_fmt="NLC",
intermediates_only=True, stop_early=True)``, which drops the ``model.num_prefix_tokens`` class and
register tokens and stops after the requested block. Mean/std come from the model's pretrained config.
A model built with ``dynamic_img_size=True`` resamples its position embeddings to each input, so
the adapter also runs views other than the native size (whole multiples of the patch; ``accepts``).

Example::

    >>> import torch, hrperc
    >>> from timm.models.vision_transformer import VisionTransformer
    >>> vit = VisionTransformer(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2, reg_tokens=4)
    >>> bb = hrperc.backbones.TimmBackbone(vit, layer=-1)
    >>> bb.num_prefix_tokens, bb.features(torch.randn(2, 3, 28, 28)).shape
    (5, torch.Size([2, 16, 32]))
"""

from __future__ import annotations

import torch
from torch import nn

from .base import VisionBackbone

__all__ = ["TimmBackbone", "is_timm_vit"]


def is_timm_vit(model) -> bool:
    """True for timm token ViTs: ``forward_intermediates``, ``num_prefix_tokens``, ``patch_embed``, ``blocks``."""
    return all(
        hasattr(model, a) for a in ("forward_intermediates", "num_prefix_tokens", "patch_embed", "blocks")
    )


class TimmBackbone(VisionBackbone):
    """Adapter for a timm ViT (see module docs). ``mean``/``std`` override the pretrained config's."""

    family = "timm"

    def __init__(
        self, model: nn.Module, layer: int = -2, mean=None, std=None, source: str | None = None
    ) -> None:
        if not is_timm_vit(model):
            raise TypeError(
                f"TimmBackbone: {type(model).__name__} is not a timm token ViT (needs forward_intermediates, "
                f"num_prefix_tokens, patch_embed and blocks, like timm's VisionTransformer or Eva)."
            )
        from timm.data import resolve_model_data_config

        cfg = resolve_model_data_config(model)
        patch = tuple(model.patch_embed.patch_size)
        size = (
            tuple(model.patch_embed.img_size)
            if model.patch_embed.img_size is not None
            else cfg["input_size"][1:]
        )
        super().__init__(
            model,
            image_size=size,
            patch_size=patch,
            hidden_size=getattr(model, "embed_dim", None) or model.num_features,
            num_layers=len(model.blocks),
            num_prefix_tokens=model.num_prefix_tokens,
            mean=cfg["mean"] if mean is None else mean,
            std=cfg["std"] if std is None else std,
            layer=layer,
            source=source,
        )
        self.dynamic_size = bool(getattr(model, "dynamic_img_size", False))

    def _set_grad_checkpointing(self, enable: bool) -> None:
        self.model.set_grad_checkpointing(enable)

    def _patch_tokens(self, pixels: torch.Tensor, k: int) -> torch.Tensor:
        out = self.model.forward_intermediates(
            pixels, indices=[k - 1], output_fmt="NLC", intermediates_only=True, stop_early=True, norm=False
        )
        return out[0]
