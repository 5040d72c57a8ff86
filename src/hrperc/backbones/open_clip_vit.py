"""open_clip ``VisionTransformer`` (``model.visual``) as a backbone.

Tokens come from open_clip's ``forward_intermediates(indices=[k-1], output_fmt="NLC",
intermediates_only=True, stop_early=True)``: conv patch embedding, class token, positional embedding,
``ln_pre``, then the first ``k`` residual blocks; ``ln_post`` and the projection are not applied (LLaVA
reads the un-normalized block output). The prefix-token count is read off the positional embedding.
open_clip's tower adds a positional embedding of its native grid and cannot resample it, so the
adapter runs the native size only (``accepts``).
open_clip models whose tower is a timm trunk (``TimmModel``, e.g. SigLIP) are adapted through
:class:`~hrperc.backbones.TimmBackbone` with open_clip's preprocessing mean/std.

Example::

    >>> import torch, hrperc
    >>> from open_clip.transformer import VisionTransformer
    >>> vit = VisionTransformer(image_size=28, patch_size=14, width=32, layers=2, heads=2, mlp_ratio=4.0)
    >>> hrperc.backbones.OpenClipBackbone(vit).features(torch.randn(3, 3, 28, 28)).shape
    torch.Size([3, 4, 32])
"""

from __future__ import annotations

import torch
from torch import nn

from .base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VisionBackbone

__all__ = ["OpenClipBackbone", "is_open_clip_vit"]


def is_open_clip_vit(model) -> bool:
    try:
        from open_clip.transformer import VisionTransformer
    except ImportError:  # pragma: no cover - open_clip is a dependency
        return False
    return isinstance(model, VisionTransformer)


class OpenClipBackbone(VisionBackbone):
    """Adapter for ``open_clip.transformer.VisionTransformer``; pass ``model.visual`` or the CLIP model."""

    family = "open_clip"

    def __init__(
        self, model: nn.Module, layer: int = -2, mean=None, std=None, source: str | None = None
    ) -> None:
        visual = getattr(model, "visual", model)
        if not is_open_clip_vit(visual):
            raise TypeError(
                f"OpenClipBackbone: {type(visual).__name__} is not an open_clip VisionTransformer. For open_clip "
                f"models with a timm tower use hrperc.wrap_backbone(model), which adapts model.visual.trunk."
            )
        pp = getattr(visual, "preprocess_cfg", None) or {}
        gh, gw = visual.grid_size
        super().__init__(
            visual,
            image_size=visual.image_size,
            patch_size=visual.patch_size,
            hidden_size=visual.conv1.out_channels,
            num_layers=len(visual.transformer.resblocks),
            num_prefix_tokens=visual.positional_embedding.shape[0] - gh * gw,
            mean=(pp.get("mean", OPENAI_CLIP_MEAN) if mean is None else mean),
            std=(pp.get("std", OPENAI_CLIP_STD) if std is None else std),
            layer=layer,
            source=source,
        )

    def _set_grad_checkpointing(self, enable: bool) -> None:
        self.model.set_grad_checkpointing(enable)

    def _patch_tokens(self, pixels: torch.Tensor, k: int) -> torch.Tensor:
        if self.num_prefix_tokens == 1:  # what open_clip's forward_intermediates assumes
            out = self.model.forward_intermediates(
                pixels, indices=[k - 1], output_fmt="NLC", intermediates_only=True, stop_early=True
            )
            return out["image_intermediates"][0]
        # Future layouts with more prefix tokens: run the same stages and strip them ourselves.
        x = self.model._embeds(pixels)
        _, inter = self.model.transformer.forward_intermediates(x, indices=[k - 1], stop_early=True)
        return inter[0][:, self.num_prefix_tokens :]
