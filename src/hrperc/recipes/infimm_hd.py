"""``infimm_hd``: InfiMM-HD's dynamic-resolution front end -- tiles of the ViT's size plus a global view.

From the InfiMM-HD paper (its released code has no tiling, so hrperc fixes the details and tests them
by their properties): the high-resolution image is cut into sub-images of the ViT's own size, which go
through the shared ViT together with a downsampled view of the whole image::

    image (H, W) --resize keeping the aspect ratio so that the long side is a whole number of tiles,
                   at most max_side tiles (3: 1344 px for 448 px tiles), the short side rounded-->
          --pad right / bottom with zeros to whole tiles--> a (gh, gw) grid of tiles, row-major
          + a global view: the whole image resized to (t, t)
          --ViT last layer, CLS dropped--> [global (ht*wt) | tiles merged into a (gh*ht, gw*wt) map]

Tokens: ``ht*wt * (1 + gh*gw)``; the tiles' run is the row-major map of the whole canvas (padding
tokens included, marked False in ``EncoderOutput.valid_masks``).

Options: :class:`DynamicTilesFrontEnd`'s ``max_side`` (3), ``layer`` (-1) and the encoder options.

Example::

    >>> import hrperc
    >>> enc = hrperc.create_encoder("infimm_hd", "timm:vit_tiny_patch16_224")
    >>> enc.plan((600, 1000)).grid, enc.num_tokens((600, 1000))
    ((2, 3), 1372)
"""

from __future__ import annotations

import math

import torch

from .._validation import as_int
from ..modules.frontend import FrontEnd, ViewPlan, make_layout
from ..ops import preprocess as pp
from ..ops.canvas import CropGeometry
from ..ops.crop import local_crop, local_merge
from . import register_recipe
from ._common import as_backbone, build, split_options

__all__ = ["build_infimm_hd", "DynamicTilesFrontEnd"]


class DynamicTilesFrontEnd(FrontEnd):
    """Aspect-kept tiles of the ViT's size plus a global view (see :mod:`hrperc.recipes.infimm_hd`)."""

    tile_size: tuple[int, int]  # always set: the backbone's tile

    def __init__(self, tile_size, patch_size, *, max_side: int = 3) -> None:
        super().__init__(tile_size, patch_size)
        # the most tiles along the long side (InfiMM-HD: 3, i.e. 1344 px of 448 px tiles)
        self.max_side = as_int(max_side, "max_side", example="max_side=3")

    def content_size(self, image_size) -> tuple[int, int]:
        """``(h, w)`` of the resized content: the long side a whole number of tiles (at most ``max_side``)."""
        H, W = (int(v) for v in image_size)
        th, tw = self.tile_size
        if H >= W:
            n = min(self.max_side, max(1, math.ceil(H / th)))
            return n * th, min(n * th, max(1, round(W * n * th / H)))
        n = min(self.max_side, max(1, math.ceil(W / tw)))
        return min(n * tw, max(1, round(H * n * tw / W))), n * tw

    def plan(self, image_size) -> ViewPlan:
        H, W = image_size
        (th, tw), (ht, wt) = self.tile_size, self.tile_tokens
        h, w = self.content_size((H, W))
        gh, gw = math.ceil(h / th), math.ceil(w / tw)
        geo = CropGeometry((H, W), (gh, gw), (th, tw), (gh * th, gw * tw), (0, 0, h, w), "resize_pad")
        layout = make_layout(("global", ht * wt, (ht, wt)), ("tiles", gh * gw * ht * wt, (gh * ht, gw * wt)))
        return ViewPlan((H, W), 1 + gh * gw, geo, layout)

    def views(self, pixels: torch.Tensor, plan: ViewPlan) -> torch.Tensor:
        b = pixels.shape[0]
        geo = plan.geometry
        content = pp.resize(pixels, geo.valid_box[2:])
        ch, cw = geo.canvas_size
        canvas = torch.nn.functional.pad(content, (0, cw - content.shape[-1], 0, ch - content.shape[-2]))
        tiles = local_crop(canvas, geo.grid).unflatten(0, (b, -1))
        return torch.cat([pp.resize(pixels, self.tile_size)[:, None], tiles], 1)

    def assemble(self, feats, plan, *, project=None):
        b, grid, (ht, wt), D = feats.shape[0], plan.grid, self.tile_tokens, feats.shape[-1]
        n = grid[0] * grid[1]
        fmap = local_merge(feats[:, 1:].reshape(b * n, ht, wt, D), grid, layout="nhwc").flatten(1, 2)
        tokens = torch.cat([feats[:, 0], fmap], 1)
        return tokens if project is None else project(tokens)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_side={self.max_side}"


@register_recipe("infimm_hd", front_end=DynamicTilesFrontEnd, defaults={"layer": -1})
def build_infimm_hd(backbone, **options):
    """InfiMM-HD's dynamic-resolution front end around ``backbone`` (see the module docs)."""
    own, enc = split_options("infimm_hd", options)
    bb = as_backbone(backbone, enc["layer"])
    return build(DynamicTilesFrontEnd(bb.image_size, bb.patch_size, **own), bb, enc)
