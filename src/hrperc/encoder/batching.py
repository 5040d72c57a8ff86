"""Views through a backbone in chunks: one call per view shape and chunk, never one per image.

:func:`encode_views` runs one ``(S, C, h, w)`` stack of views of one size; :func:`encode_by_shape` runs
every view of a batch, grouped by shape, and hands the features back in the structure the views came in;
:func:`views_per_call` is the chunking policy (``max_batch="auto"``; docs/encoder.md has the numbers).

Example::

    >>> import torch
    >>> from timm.models.vision_transformer import VisionTransformer
    >>> from hrperc.backbones import wrap_backbone
    >>> from hrperc.encoder.batching import encode_views
    >>> bb = wrap_backbone(VisionTransformer(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2))
    >>> encode_views(bb, torch.rand(5, 3, 28, 28), layer=-2, max_batch=2).shape  # 3 calls: 2 + 2 + 1 views
    torch.Size([5, 16, 32])
"""

from __future__ import annotations

import torch

from ..backbones.base import VisionBackbone
from ..ops.preprocess import to_unit

__all__ = ["views_per_call", "encode_views", "encode_by_shape"]

# CPU chunking budget for max_batch="auto": tokens (rows of every ViT matmul) per backbone call.
# 2048 = 3 ViT-L/14-336 tiles (577 tokens) or 10 ViT-B/16 tiles (197). The targets: >= 0.95x the
# speed of serial one-tile passes and <= 1.2x their peak memory (docs/encoder.md; bench_encoder.py
# measures both). Narrow towers (width < 768) get 768 // width times the tokens (at most 8x): one of
# their tiles leaves the matmuls idle and per-call overhead dominates. On a GPU: 32 native tiles' worth.
_CPU_TOKENS_PER_CALL = 2048
_CPU_FULL_WIDTH = 768
_CPU_NARROW_FACTOR = 8
_GPU_TILES_PER_CALL = 32


def views_per_call(bb: VisionBackbone, size, max_batch: int | str) -> int:
    """Views of ``size = (h, w)`` per backbone call: ``max_batch``, or its ``"auto"`` value on ``bb``'s device."""
    if isinstance(max_batch, int):
        return max_batch
    tokens = (size[0] // bb.patch_size[0]) * (size[1] // bb.patch_size[1])
    if bb.device.type == "cpu":
        factor = min(_CPU_NARROW_FACTOR, max(1, _CPU_FULL_WIDTH // bb.hidden_size))
        return max(1, _CPU_TOKENS_PER_CALL * factor // (tokens + bb.num_prefix_tokens))
    return max(1, _GPU_TILES_PER_CALL * bb.num_patches // tokens)


def encode_views(
    bb: VisionBackbone,
    pixels: torch.Tensor,
    layer,
    max_batch: int | str = "auto",
    train: bool = False,
    *,
    prefix: bool = False,
) -> torch.Tensor:
    """``(S, C, h, w)`` views in ``[0, 1]`` (or uint8 ``[0, 255]``) of one size -> ``(S, t, D)`` features,
    ``t = (h // ph) * (w // pw)``, in chunks of :func:`views_per_call`. uint8 pixels are converted one chunk at
    a time (no float copy of the stack); gradients reach the backbone only with ``train=True``. ``layer`` and
    ``prefix`` are :meth:`VisionBackbone.features`'s (a list of layers: ``len(layer) * D`` channels;
    ``prefix=True``: the prefix tokens first)."""
    if pixels.shape[0] == 0:
        t = (pixels.shape[-2] // bb.patch_size[0]) * (pixels.shape[-1] // bb.patch_size[1])
        t += bb.num_prefix_tokens if prefix else 0
        return torch.zeros(0, t, bb.feature_width(layer), dtype=bb.dtype, device=bb.device)

    def encode(chunk: torch.Tensor) -> torch.Tensor:
        x = bb.normalize(chunk.to(bb.device))  # float32
        x = x.to(bb.dtype)  # a bf16 / fp16 backbone: the float32 copy is freed here, before the blocks run
        # prefix= only when asked: a user's backbone whose features(x, layer) predates it still runs
        return bb.features(x, layer=layer, prefix=True) if prefix else bb.features(x, layer=layer)

    with torch.set_grad_enabled(torch.is_grad_enabled() and train):
        feats = [encode(c) for c in pixels.split(views_per_call(bb, pixels.shape[-2:], max_batch))]
    return feats[0] if len(feats) == 1 else torch.cat(feats)


def encode_by_shape(
    groups: list[tuple[torch.Tensor, ...]], encode, accepts, refuse, encode_packed=None
) -> tuple[list[tuple[torch.Tensor, ...]], int]:
    """Every view of a batch through the backbone, one stack per view shape (parts in order, then groups).

    ``groups``: per image group, parts ``(b, V, C, h, w)``; ``encode``: ``(S, C, h, w) -> (S, t, D)`` (e.g.
    :func:`encode_views` bound to a backbone); ``accepts(shape) -> bool`` and ``refuse(shape) -> Exception``
    for a view size the backbone does not take. ``encode_packed``, for a backbone that runs views of every
    size in one packed call (a native-resolution tower): ``[(S_i, C, h_i, w_i)] -> [(S_i, t_i, D)]``, called
    once with every shape's stack instead of ``encode`` per shape. Returns the same structure of
    ``(b, V, t, D)`` features and the number of views encoded. uint8 and float views of one shape are
    joined in ``[0, 1]``."""
    by_shape: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for p in range(max(len(parts) for parts in groups)):
        for g, parts in enumerate(groups):
            if p < len(parts):
                by_shape.setdefault(tuple(parts[p].shape[-2:]), []).append((g, p))
    out: list[list] = [[None] * len(parts) for parts in groups]
    stacks = []
    for shape, keys in by_shape.items():
        if not accepts(shape):
            raise refuse(shape)
        flat = [groups[g][p].flatten(0, 1) for g, p in keys]
        if len({f.dtype for f in flat}) > 1:  # uint8 and float views: uint8 to [0, 1] before joining
            flat = [to_unit(f) for f in flat]
        stacks.append(flat[0] if len(flat) == 1 else torch.cat(flat))
    encoded = encode_packed(stacks) if encode_packed is not None else [encode(s) for s in stacks]
    for keys, feats in zip(by_shape.values(), encoded):
        start = 0
        for g, p in keys:
            b, v = groups[g][p].shape[:2]
            out[g][p] = feats[start : start + b * v].view(b, v, *feats.shape[1:])
            start += b * v
    return [tuple(parts) for parts in out], sum(p.shape[0] * p.shape[1] for parts in groups for p in parts)
