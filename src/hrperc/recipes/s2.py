"""``s2``: S2 multi-scale ("Scaling on Scales") -- the same square image at several scales, features merged.

The S2-wrapper's ``forward`` (``s2wrapper/core.py`` of bfshi/scaling_on_scales), as LLaVA's S2 towers
run it, with integer scales::

    image (H, W) --LLaVA's square preprocessing at the largest scale (pad to a square with the mean
                   colour, resize; pad=False: shortest edge + centre crop)--> (L, L), L = max(scales) * t
          --for each scale s: bicubic resize (no antialias, as S2) to (s*t, s*t), cut into s x s tiles
          --ViT layer -2, CLS dropped, ALL tiles of all scales in one batched pass-->
          --merge each scale's tiles into its (s*ht, s*wt) map, area-resize to the first scale's map-->
          --concatenate on channels--> (s0*ht * s0*wt) tokens of width len(scales) * D

Default scales ``(1, 2)``: 576 tokens of width ``2D`` for CLIP ViT-L/14-336. S2 resizes the already
normalized image; hrperc resizes ``[0, 1]`` pixels and normalizes after, the same to float rounding
(a bicubic resize is an affine map whose weights sum to one).

Options: :class:`MultiScaleFrontEnd`'s ``scales`` (positive ints, e.g. ``(1, 2, 3)``) and ``pad`` (default
True), ``layer`` (-2) and the encoder options.

Example::

    >>> import hrperc
    >>> enc = hrperc.create_encoder("s2", "timm:vit_tiny_patch16_224")
    >>> enc.num_tokens((480, 640)), enc.num_backbone_passes((480, 640))     # 1 + 4 tiles
    (196, 5)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validation import as_bool, as_index, as_sequence
from ..modules.frontend import FrontEnd, ViewPlan, make_layout
from ..ops import preprocess as pp
from ..ops.canvas import CropGeometry
from ..ops.crop import local_crop, local_merge
from . import register_recipe
from ._common import as_backbone, build, split_options
from .llava15 import mean_colour

__all__ = ["build_s2", "MultiScaleFrontEnd"]


class MultiScaleFrontEnd(FrontEnd):
    """S2's multi-scale views and channel concatenation (see :mod:`hrperc.recipes.s2`)."""

    tile_size: tuple[int, int]  # always set: the backbone's tile

    def __init__(self, tile_size, patch_size, *, scales=(1, 2), pad: bool = True, colour=(0, 0, 0)) -> None:
        super().__init__(tile_size, patch_size)
        # One scale may be given bare (scales=2); a list, tuple or 1-D array / tensor is checked entry by entry.
        listed = (scales,) if as_index(scales) is not None else as_sequence(scales, "scales", example="(1, 2)")
        scales = tuple(as_index(s) for s in listed)
        if any(s is None or s < 1 for s in scales):
            raise ValueError(
                f"scales={listed!r}; pass positive ints (multiples of the backbone's tile), e.g. scales=(1, 2) "
                f"(S2's default for LLaVA) or (1, 2, 3)."
            )
        if self.tile_size[0] != self.tile_size[1]:
            raise ValueError(f"S2 takes square tiles; the backbone's are {self.tile_size}.")
        self.scales, self.pad, self.colour = scales, as_bool(pad, "pad"), tuple(int(c) for c in colour)

    def token_width(self, width: int) -> int:
        return width * len(self.scales)

    def plan(self, image_size) -> ViewPlan:
        H, W = image_size
        (t, _), (ht, wt) = self.tile_size, self.tile_tokens
        top = max(self.scales)
        side = top * t
        if self.pad:
            big = max(H, W)
            box = (
                round((big - H) // 2 * side / big),
                round((big - W) // 2 * side / big),
                max(1, round(H * side / big)),
                max(1, round(W * side / big)),
            )
        else:
            box = (0, 0, side, side)
        geo = CropGeometry((H, W), (top, top), (t, t), (side, side), box, "pad" if self.pad else "crop")
        s0 = self.scales[0]
        layout = make_layout(("scales", s0 * ht * s0 * wt, (s0 * ht, s0 * wt)))
        return ViewPlan((H, W), sum(s * s for s in self.scales), geo, layout)

    def views(self, pixels: torch.Tensor, plan: ViewPlan) -> torch.Tensor:
        b, t = pixels.shape[0], self.tile_size[0]
        side = plan.geometry.canvas_size
        if self.pad:
            canvas = pp.resize(pp.pad_to_square(pixels, self.colour), side)
        else:
            canvas = pp.center_crop(pp.resize(pixels, pp.shortest_edge_size(pixels.shape[-2:], side[0])), side)
        canvas = pp.to_unit(canvas)
        parts = []
        for s in self.scales:  # a loop over scales (2 or 3), not tiles
            x = F.interpolate(canvas, size=(s * t, s * t), mode="bicubic") if s * t != side[0] else canvas
            parts.append(local_crop(x, (s, s)).unflatten(0, (b, -1)))
        return torch.cat(parts, 1)

    def assemble(self, feats, plan, *, project=None):
        b, (ht, wt), D = feats.shape[0], self.tile_tokens, feats.shape[-1]
        s0 = self.scales[0]
        maps, start = [], 0
        for s in self.scales:
            tiles = feats[:, start : start + s * s].reshape(b * s * s, ht, wt, D).permute(0, 3, 1, 2)
            start += s * s
            m = local_merge(tiles, (s, s))  # (b, D, s*ht, s*wt)
            maps.append(F.interpolate(m.float(), size=(s0 * ht, s0 * wt), mode="area").to(m.dtype))
        tokens = torch.cat(maps, 1).flatten(2).transpose(1, 2)  # (b, s0*ht*s0*wt, len(scales)*D)
        return tokens if project is None else project(tokens)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scales={self.scales}, pad={self.pad}"


@register_recipe("s2", front_end=MultiScaleFrontEnd, leave_out=("colour",), defaults={"layer": -2})
def build_s2(backbone, **options):
    """S2's multi-scale front end around ``backbone`` (see the module docs)."""
    own, enc = split_options("s2", options)
    bb = as_backbone(backbone, enc["layer"])
    return build(MultiScaleFrontEnd(bb.image_size, bb.patch_size, colour=mean_colour(bb), **own), bb, enc)
