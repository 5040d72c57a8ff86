"""``internvl``: InternVL's dynamic tiling -- the closest-aspect grid of 1..12 tiles, a thumbnail, pixel shuffle.

Exactly ``GotOcr2ImageProcessor(crop_to_patches=True)`` (transformers' default torchvision backend, the
image processor of ``InternVLProcessor``) and ``InternVLModel.get_image_features`` before the projector::

    image (H, W) --grid: closest aspect ratio among gh*gw in [1, 12], InternVL's tie-break
                   (hrperc.ops.canvas.select_grid(rule="aspect"))--> resize to (gh*t, gw*t), no aspect kept
          --> gh*gw tiles, row-major, + a thumbnail (the whole image resized to (t, t)) when gh*gw > 1
          --ViT last layer, CLS dropped--> per view (ht, wt, D)
          --pixel shuffle 0.5: each 2x2 block of tokens into one token of 4D channels--> (ht/2 * wt/2, 4D)

256 tokens of width ``4D`` per view for InternViT-300M-448px (``ht = 32``); ``num_tokens`` counts the
``<IMG_CONTEXT>`` placeholders, ``256 * views`` (``InternVLProcessor`` adds ``<img>`` / ``</img>`` around
them, which are text tokens). The channel order of a shuffled token is ``(di, dj, d)`` for the token
at ``(2i + di, 2j + dj)``, as ``InternVLModel.pixel_shuffle`` computes it.

``dcm=True`` adds INF-LLaVA's strided views of the same canvas and the DEM (``dem=``, default a fresh
one with ``reduction="none"``), whose enhanced map is cut back into the tiles before the shuffle: the
same views, layout and count.

Options: the keyword arguments of :class:`TilingFrontEnd` (``max_tiles`` 12, ``min_tiles`` 1,
``thumbnail`` True, ``downsample`` 2: the shuffle's factor, ``1`` turns it off; ``dcm``), ``dem``,
``layer`` (default -1) and the encoder options.

Example::

    >>> import torch, hrperc
    >>> from timm.models.vision_transformer import VisionTransformer
    >>> vit = VisionTransformer(img_size=56, patch_size=7, embed_dim=32, depth=2, num_heads=2)   # 8 x 8 tokens
    >>> enc = hrperc.create_encoder("internvl", vit)
    >>> enc.plan((480, 640)).grid, enc.num_tokens((480, 640))          # 12 tiles + thumbnail, 16 each
    ((3, 4), 208)
    >>> enc(torch.rand(3, 480, 640)).tokens.shape                           # width 4 * 32 after the shuffle
    torch.Size([1, 208, 128])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from .._validation import as_bool, as_int
from ..modules.frontend import FrontEnd, ViewPlan, make_layout
from ..ops import preprocess as pp
from ..ops.canvas import CropGeometry, select_grid
from ..ops.crop import local_crop, stride_crop
from . import register_recipe
from ._common import as_backbone, build, split_options

__all__ = ["build_internvl", "TilingFrontEnd", "TilingPlan", "pixel_shuffle"]


def pixel_shuffle(tokens: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """``(B, h, w, D) -> (B, h/f, w/f, f*f*D)``: InternVL's pixel shuffle (``scale_factor = 1/f``).

    Token ``(i, j)`` holds the ``f x f`` block at rows ``f*i + di``, columns ``f*j + dj``, channels in
    ``(di, dj, d)`` order.
    """
    return rearrange(tokens, "b (i di) (j dj) d -> b i j (di dj d)", di=factor, dj=factor)


@dataclass(frozen=True)
class TilingPlan(ViewPlan):
    """An InternVL image's plan: the ``gh*gw`` tiles, then the thumbnail when ``thumbnail`` (only for more
    than one tile), then (``dcm=True``) the tiles' strided views."""

    thumbnail: bool


class TilingFrontEnd(FrontEnd[TilingPlan]):
    """InternVL's tiles + thumbnail + pixel shuffle (see :mod:`hrperc.recipes.internvl`)."""

    tile_size: tuple[int, int]  # always set: the backbone's tile

    def __init__(
        self,
        tile_size,
        patch_size,
        *,
        max_tiles: int = 12,
        min_tiles: int = 1,
        thumbnail: bool = True,
        downsample: int = 2,
        dcm: bool = False,
    ) -> None:
        super().__init__(tile_size, patch_size)
        max_tiles, min_tiles = as_int(max_tiles, "max_tiles"), as_int(min_tiles, "min_tiles")
        select_grid((1, 1), self.tile_size, max_tiles, min_tiles, rule="aspect")  # validates min_tiles <= max_tiles
        downsample = as_int(downsample, "downsample", example="downsample=2 (InternVL's scale 0.5)")
        ht, wt = self.tile_tokens
        if ht % downsample or wt % downsample:
            raise ValueError(
                f"downsample={downsample} needs the tile's token grid ({ht}, {wt}) to be divisible by "
                f"{downsample} (InternViT-448/14: 32 x 32). Pass downsample=1, or a backbone with such a grid."
            )
        self.max_tiles, self.min_tiles, self.thumbnail = max_tiles, min_tiles, as_bool(thumbnail, "thumbnail")
        self.downsample, self.uses_dem = downsample, as_bool(dcm, "dcm")

    def token_width(self, width: int) -> int:
        return width * self.downsample**2

    def plan(self, image_size) -> TilingPlan:
        H, W = image_size
        (th, tw), (ht, wt) = self.tile_size, self.tile_tokens
        gh, gw = select_grid((H, W), (th, tw), self.max_tiles, self.min_tiles, rule="aspect")
        n = gh * gw
        thumb = self.thumbnail and n > 1
        f = self.downsample
        per = (ht // f) * (wt // f)
        runs = [("tiles", n * per, (ht // f, wt // f) if n == 1 else None)]
        if thumb:
            runs.append(("thumbnail", per, (ht // f, wt // f)))
        geo = CropGeometry((H, W), (gh, gw), (th, tw), (gh * th, gw * tw), (0, 0, gh * th, gw * tw), "resize")
        views = n + thumb + (n if self.uses_dem else 0)
        return TilingPlan((H, W), views, geo, make_layout(*runs), thumb)

    def views(self, pixels: torch.Tensor, plan: TilingPlan) -> torch.Tensor:
        b, grid = pixels.shape[0], plan.grid
        canvas = pp.resize(pixels, plan.geometry.canvas_size)
        parts = [local_crop(canvas, grid).unflatten(0, (b, -1))]
        if plan.thumbnail:
            parts.append(pp.resize(pixels, self.tile_size)[:, None])
        if self.uses_dem:
            parts.append(stride_crop(canvas, grid).unflatten(0, (b, -1)))
        return torch.cat(parts, 1)

    def assemble(self, feats, plan: TilingPlan, *, project=None):
        b, grid, (ht, wt) = feats.shape[0], plan.grid, self.tile_tokens
        n, D, thumb = grid[0] * grid[1], feats.shape[-1], plan.thumbnail
        if self.uses_dem:  # the DEM computes in its own dtype
            feats = self.in_dem_dtype(feats)
        own = feats[:, : n + thumb]
        if self.uses_dem:
            tiles, strided = feats[:, :n].flatten(0, 1), feats[:, n + thumb :].flatten(0, 1)
            fmap = self.held_dem()(tiles, strided, grid, tile_size=(ht, wt))  # (b, gh*ht*gw*wt, D) row-major map
            enhanced = local_crop(fmap, grid, layout="nlc", size=(grid[0] * ht, grid[1] * wt)).unflatten(0, (b, n))
            own = torch.cat([enhanced, own[:, n:]], 1)
        views = own.shape[1]
        shuffled = pixel_shuffle(own.reshape(b * views, ht, wt, D), self.downsample).flatten(1, 2)
        tokens = shuffled.reshape(b, views * shuffled.shape[1], shuffled.shape[-1])
        return tokens if project is None else project(tokens)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, tiles=[{self.min_tiles}, {self.max_tiles}], thumbnail={self.thumbnail}, "
            f"downsample={self.downsample}, dcm={self.uses_dem}"
        )


@register_recipe("internvl", front_end=TilingFrontEnd, defaults={"layer": -1})
def build_internvl(backbone, **options):
    """InternVL's dynamic-tiling front end around ``backbone`` (see the module docs)."""
    own, enc = split_options("internvl", options)
    bb = as_backbone(backbone, enc["layer"])
    return build(TilingFrontEnd(bb.image_size, bb.patch_size, **own), bb, enc)
