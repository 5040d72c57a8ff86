"""Tiny seeded models and images shared by the tests (one helper instead of a copy per file).

``vit()`` is the tiny timm ViT most tests wrap or hand to ``create_encoder``: 28 px tiles of 7 px
patches (a 4 x 4 token grid), width 32, 2 blocks of 2 heads, no classifier head, weights drawn after
``torch.manual_seed(seed)`` so that two calls with the same arguments give the same weights.
"""

from __future__ import annotations

import torch


def vit(
    img: int = 28,
    *,
    patch: int = 7,
    dim: int = 32,
    depth: int = 2,
    heads: int = 2,
    seed: int = 0,
    num_classes: int = 0,
    dynamic: bool = False,
):
    """A ``timm`` ``VisionTransformer`` of ``img`` x ``img`` tiles, seeded.

    Args:
        img: tile side in pixels (a whole number of ``patch``).
        patch: patch side in pixels.
        dim, depth, heads: width, blocks, attention heads (``dim`` divisible by ``heads``).
        seed: ``torch.manual_seed`` before the weights are drawn.
        num_classes: the classifier head's outputs (0: none). A head changes the other weights too: timm
            draws its default init before re-initialising every module, so keep the value a test was
            written with.
        dynamic: ``dynamic_img_size=True``: the ViT runs views of any whole number of patches (its position
            embeddings are resampled), not only ``img`` x ``img``.

    Returns the model in training mode (its dropout rates are 0, so outputs are the same in eval mode).

    Example::

        >>> m = vit()
        >>> m(torch.rand(1, 3, 28, 28)).shape
        torch.Size([1, 32])
        >>> torch.equal(vit().pos_embed, m.pos_embed), torch.equal(vit(seed=1).pos_embed, m.pos_embed)
        (True, False)
    """
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=img,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        num_classes=num_classes,
        dynamic_img_size=dynamic,
    )


def random_images(sizes, seed: int = 0) -> list[torch.Tensor]:
    """Seeded random uint8 images, one (3, H, W) tensor per ``(H, W)`` in ``sizes`` (the same pixels for the
    same arguments, whatever else the test drew)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
