"""Pixtral's vision tower (Pixtral-12B in LLaVA, Mistral 3), packed: :class:`PixtralBackbone`.

``PixtralVisionModel`` reads every image at its own resolution (sides multiples of its patch ``p``),
one sequence of ``(h / p) * (w / p)`` patches per image, with 2-D rotary positions (row, column) that
start at 0 in every image. transformers runs a batch as one sequence of all images' patches and, under
its ``sdpa`` and ``eager`` attention, builds a dense ``(1, 1, S, S)`` block mask over the whole batch
(``S`` = all patches of all images) so that no image attends to another. This adapter runs the tower's
own modules on the same packed sequence without that mask::

    stacks [(S_i, 3, h_i, w_i)], normalized, one stack per view size
      --patch_conv, one call per size--> ln_pre --> one sequence (N, D), N = sum_i S_i * t_i
      --patch_positional_embedding (the tower's rotary module), positions per image-->  cos, sin (N, head_dim)
      --layers 1..k: attention_norm, q/k/v_proj, rotary, ATTENTION PER IMAGE, o_proj, ffn_norm, feed_forward-->
    features [(S_i, t_i, D)], t_i = (h_i / p) * (w_i / p), raster order: hidden_states[k] of the model

The attention of each layer is ``scaled_dot_product_attention`` on ``(images, heads, t, head_dim)``
blocks, one call per distinct view size (images of one size are one batch of the call), so memory grows
with ``sum_i t_i**2`` for the scores at most (less under SDPA's fused kernels), never with ``S**2``, and
no image sees another. Everything else is the model's modules called on the packed sequence, so the
features equal ``model.get_image_features``' within float rounding (fp32: ~1e-9 against the dense mask).

Layers are numbered like the model's ``hidden_states`` (``vision_feature_layer``): ``k`` in ``1..L`` is
the output of layer ``k``, ``-1`` the last (Pixtral-12B's and Mistral 3's choice). ``layer=0`` (the
``ln_pre`` output) and lists of layers are not supported.

Example::

    >>> import torch
    >>> from transformers import PixtralVisionConfig, PixtralVisionModel
    >>> from hrperc.backbones.pixtral import PixtralBackbone
    >>> config = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                              num_attention_heads=2, head_dim=16, patch_size=16)
    >>> bb = PixtralBackbone(PixtralVisionModel(config).eval())
    >>> bb.patch_size, bb.hidden_size, bb.num_layers, bb.layer, bb.packs_views
    ((16, 16), 32, 2, -1, True)
    >>> stacks = [bb.normalize(torch.rand(2, 3, 32, 48)), bb.normalize(torch.rand(1, 3, 64, 16))]
    >>> [tuple(f.shape) for f in bb.features_packed(stacks)]       # one pass, attention per image
    [(2, 6, 32), (1, 4, 32)]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .._errors import public
from .base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VisionBackbone, class_name, resolve_layer

__all__ = ["PixtralBackbone", "is_pixtral_tower"]

_WHAT_TO_PASS = (
    "Pass the vision tower of a Pixtral model: model.model.vision_tower (a PixtralVisionModel) of a "
    "LlavaForConditionalGeneration with a Pixtral tower (Pixtral-12B) or of a Mistral3ForConditionalGeneration."
)


def is_pixtral_tower(tower) -> bool:
    """Whether ``tower`` is a transformers ``PixtralVisionModel`` (or a subclass) with the parts this adapter
    runs (``patch_conv``, ``ln_pre``, ``patch_positional_embedding``, ``transformer.layers``)."""
    named = any(cls.__name__ == "PixtralVisionModel" for cls in type(tower).__mro__)
    parts = ("patch_conv", "ln_pre", "patch_positional_embedding", "transformer")
    return named and isinstance(tower, nn.Module) and all(hasattr(tower, a) for a in parts)


def _held_tower(model) -> str | None:
    """Where a full model holds its Pixtral tower (``".model.vision_tower"`` or ``".vision_tower"``), else ``None``."""
    for path in (("model", "vision_tower"), ("vision_tower",)):
        inner = model
        for name in path:
            inner = getattr(inner, name, None)
        if inner is not None and is_pixtral_tower(inner):
            return "." + ".".join(path)
    return None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class PixtralBackbone(VisionBackbone):
    """A transformers ``PixtralVisionModel`` as an hrperc backbone: views of any size (whole patches), every
    view of a batch in one packed pass with per-image attention (``packs_views``; see the module docs).

    Features are patch-level, ``(h // p) * (w // p)`` per view in raster order, of the tower's width: for
    Pixtral-12B (LLaVA) the tokens its projector maps one to one; Mistral 3 merges ``2 x 2`` of them in its
    projector (the ``pixtral`` recipe lays them out for that, :mod:`hrperc.recipes.pixtral`).

    Args:
        tower: ``model.model.vision_tower`` of a LLaVA-with-Pixtral or Mistral 3 model.
        layer: the layer read (``vision_feature_layer``), default -1 (the last).
        mean, std: per-channel normalization of ``[0, 1]`` RGB; ``None`` = CLIP's (the processors' of
            Pixtral-12B and Mistral 3).
    """

    family = "pixtral"
    dynamic_size = True
    packs_views = True
    packs_pixels = True  # features_packed(..., pixels=True): normalizes each stack right before its convolution

    @public(name=class_name())
    def __init__(self, tower, *, layer: int = -1, mean=None, std=None) -> None:
        if not is_pixtral_tower(tower):
            where = _held_tower(tower) if isinstance(tower, nn.Module) else None
            hint = f" It holds one: pass its {where}." if where is not None else ""
            raise TypeError(f"tower={type(tower).__name__} is not a Pixtral vision tower.{hint} {_WHAT_TO_PASS}")
        if isinstance(layer, (list, tuple)):
            raise TypeError(
                f"layer={list(layer)!r}; this backbone reads one layer (several, concatenated on the channels as a "
                f"list vision_feature_layer does, are not supported). Pass one int, e.g. layer=-1 (the last)."
            )
        config: Any = tower.config
        p = int(config.patch_size)
        super().__init__(
            tower,
            image_size=(p, p),
            patch_size=(p, p),
            hidden_size=int(config.hidden_size),
            num_layers=len(tower.transformer.layers),
            num_prefix_tokens=0,
            mean=OPENAI_CLIP_MEAN if mean is None else mean,
            std=OPENAI_CLIP_STD if std is None else std,
            layer=layer,
        )

    def _set_grad_checkpointing(self, enable: bool) -> None:
        pass  # self.grad_checkpointing is read in _run: the layers run there, not in the tower's forward

    def _patch_tokens(self, pixels: torch.Tensor, k: int) -> torch.Tensor:
        return self._run([pixels], k)[0]

    @public(name=class_name(".features_packed"))
    def features_packed(
        self, stacks: list[torch.Tensor], layer: int | None = None, *, pixels: bool = False
    ) -> list[torch.Tensor]:
        """Every view of every stack ``[(S_i, 3, h_i, w_i)]`` (normalized, sides multiples of the patch) in ONE
        packed pass of the tower, attention per image -> ``[(S_i, t_i, D)]``, ``t_i = (h_i/p) * (w_i/p)``.

        ``pixels=True``: the stacks are pixels (uint8 ``[0, 255]`` or ``[0, 1]`` floats), each normalized
        (:meth:`normalize`) right before its patch convolution, so one stack's float copy is alive at a time
        (the runner's path; the same values as normalizing first)."""
        if not isinstance(stacks, (list, tuple)) or not stacks:
            raise TypeError(
                f"stacks={type(stacks).__name__}; expected a non-empty list of (S, 3, h, w) tensors. "
                "Pass e.g. [x] for one stack of views of one size."
            )
        p = self.patch_size[0]
        for i, s in enumerate(stacks):
            if not isinstance(s, torch.Tensor) or not (s.is_floating_point() or (pixels and s.dtype == torch.uint8)):
                got = s.dtype if isinstance(s, torch.Tensor) else type(s).__name__
                raise TypeError(f"stacks[{i}] is {got}; expected normalized float pixels. Pass bb.normalize(x).")
            if s.ndim != 4 or s.shape[1] != 3 or s.shape[-2] % p or s.shape[-1] % p or min(s.shape[-2:]) < p:
                raise ValueError(
                    f"stacks[{i}] has shape {tuple(s.shape)}; expected (S, 3, h, w) with h and w positive multiples "
                    f"of the patch ({p}). Resize the views to whole patches first."
                )
        k = resolve_layer(self.layer if layer is None else layer, self.num_layers)
        if pixels:
            return self._run([s.to(self.device) for s in stacks], k, normalize=True)
        return self._run([s.to(self.device, self.dtype) for s in stacks], k)

    def _run(self, stacks: list[torch.Tensor], k: int, normalize: bool = False) -> list[torch.Tensor]:
        """The packed pass (see the module docs): ``k`` layers over all stacks' patches at once."""
        tower = self.model
        conv = tower.patch_conv
        p, d = self.patch_size[0], self.hidden_size
        blocks, start = [], 0  # (first row, images, patches each) per stack
        for s in stacks:
            blocks.append((start, int(s.shape[0]), (s.shape[-2] // p) * (s.shape[-1] // p)))
            start += blocks[-1][1] * blocks[-1][2]
        embeds = torch.empty(start, d, dtype=conv.weight.dtype, device=conv.weight.device)
        for s, (b, n, t) in zip(stacks, blocks):  # one patch convolution per view size (the model's, unpadded)
            x = (self.normalize(s) if normalize else s).to(conv.weight.dtype)
            e = conv(x)  # (S, D, gh, gw)
            embeds[b : b + n * t].view(n, e.shape[-2], e.shape[-1], d).copy_(e.permute(0, 2, 3, 1))  # raster order
            del x, e
        x = tower.ln_pre(embeds)
        del embeds
        cos, sin = tower.patch_positional_embedding(x, _positions(stacks, p, x.device))
        for layer in tower.transformer.layers[:k]:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self._layer, layer, x, cos, sin, blocks, use_reentrant=False)
            else:
                x = self._layer(layer, x, cos, sin, blocks)
        return [x[b : b + n * t].view(n, t, x.shape[-1]) for b, n, t in blocks]

    @staticmethod
    def _layer(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, blocks) -> torch.Tensor:
        """One ``PixtralAttentionLayer`` on the packed ``(N, D)`` sequence: the layer's modules in its order,
        the attention computed per image (``blocks``: ``(start, images, tokens each)``)."""
        # The attention's intermediates (normed input, q, k, v, per-size outputs: five (N, D) tensors) are
        # freed when _attention returns, before the MLP allocates its (N, 4D) ones: the layer's peak.
        x = x + PixtralBackbone._attention(layer.attention, layer.attention_norm(x), cos, sin, blocks)
        return x + layer.feed_forward(layer.ffn_norm(x))

    @staticmethod
    def _attention(attn, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, blocks) -> torch.Tensor:
        """``PixtralAttention`` on the normed ``(N, D)`` sequence, one SDPA call per view size (its images are
        the batch of the call) -> the ``o_proj`` output ``(N, D)``."""
        N, heads = h.shape[0], int(attn.num_heads)
        q, k, v = (proj(h).view(N, heads, -1) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        del h
        c, s = cos[:, None], sin[:, None]  # the model's rotary (rotate_half), in the activation dtype
        q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
        scale = getattr(attn, "scaling", None) or q.shape[-1] ** -0.5
        dropout = float(attn.dropout) if attn.training else 0.0
        out = torch.empty_like(v)  # (N, heads, head_dim): each size's output written in place, no concatenation
        for b, n, t in blocks:
            qb, kb, vb = (y[b : b + n * t].view(n, t, heads, -1).transpose(1, 2) for y in (q, k, v))
            o = nn.functional.scaled_dot_product_attention(qb, kb, vb, dropout_p=dropout, scale=scale)
            out[b : b + n * t].view(n, t, heads, -1).copy_(o.transpose(1, 2))
        del q, k, v
        return attn.o_proj(out.view(N, -1))


def _positions(stacks: list[torch.Tensor], p: int, device) -> torch.Tensor:
    """``(N, 2)`` long: every patch's (row, column) in its own view, views in stack order, raster order inside
    one (the positions the model gives each image); a few ops for the whole batch, not a few per view size."""
    grids = torch.tensor([[s.shape[-2] // p, s.shape[-1] // p] for s in stacks], device=device)
    count = torch.tensor([s.shape[0] for s in stacks], device=device)
    per_view = grids.repeat_interleave(count, 0)  # (views, 2)
    t = per_view.prod(1)
    gw = per_view[:, 1].repeat_interleave(t)  # each patch's view width
    local = torch.arange(int(t.sum()), device=device) - (t.cumsum(0) - t).repeat_interleave(t)
    return torch.stack([local // gw, local % gw], -1)
