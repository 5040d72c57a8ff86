"""Hugging Face ``CLIPVisionModel`` and ``SiglipVisionModel`` (or the full CLIP/SigLIP models) as a backbone.

Layer ``k`` is ``hidden_states[k]`` of the model's own forward (``hidden_states[0]`` being the
embeddings), prefix tokens dropped: CLIP has one class token, SigLIP none; the count is read off the
embeddings (``num_positions - num_patches``). The adapter captures block ``k``'s output with a forward
hook instead of ``output_hidden_states=True``, so the other layers' activations are never kept, and
stops the forward there (unless gradient checkpointing recomputes blocks in backward, where the hook
must stay passive). Mean/std come from ``preprocessor_config.json`` when loaded from a directory.

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


class _Stop(Exception):
    """Raised by the capture hook to end the forward after the requested block."""


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
        captured: list[torch.Tensor] = []
        stop_early = not (self.grad_checkpointing and torch.is_grad_enabled())

        def hook(_module, _args, output):
            captured.append(output[0] if isinstance(output, tuple) else output)
            if stop_early:
                raise _Stop

        handle = self.model.encoder.layers[k - 1].register_forward_hook(hook)
        try:
            self.model(pixel_values=pixels)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured[0][:, self.num_prefix_tokens :]
