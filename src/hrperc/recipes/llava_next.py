"""``llava_next``: LLaVA-NeXT (1.6) "anyres" -- a base view plus tiles of the best pinpoint canvas, unpadded.

Exactly ``LlavaNextImageProcessor`` (transformers' default torchvision backend), ``LlavaNextProcessor``'s
token count and ``LlavaNextModel.pack_image_features`` before the projector::

    image (H, W) --best resolution among the pinpoints (hrperc.ops.anyres)--> canvas (gh*t, gw*t)
          --resize keeping the aspect ratio, centre on the canvas (zeros)--> gh*gw tiles, row-major
          + base view: the whole image resized to (t, t)
          --ViT layer -2, CLS dropped--> base (ht*wt) | tiles merged into a (gh*ht, gw*wt) map
          --unpad: drop the rows / columns that hold only canvas padding--> (rows, cols)
          --one newline slot after every row--> ht*wt + rows*(cols + 1) tokens

The pinpoints default to LLaVA-NeXT's ``[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]``
scaled to the backbone's tile (``t / 336``); ``tie_break`` picks how they are read (``"transformers"``,
the default, or ``"original"``: the LLaVA-1.6 research code; see :mod:`hrperc.ops.anyres`). Newline
slots are zeros in the encoder's output, marked by ``EncoderOutput.slot_mask``; a model fills them with
its ``image_newline`` (``forward(newline=...)``).

``dcm=True`` puts INF-LLaVA's dual perspectives on top: the strided global views of the same canvas
go through the ViT too, the DEM (``dem=``, default a fresh one with ``reduction="none"``) enhances the
tiles' map with them, and the enhanced map takes the tiles' place -- the same layout, the same count.

``layer`` may be a list, the model's list ``vision_feature_layer``: ``layer=[-2, -5, -8]`` concatenates the
layers' tokens on the channels in that order (``token_width`` ``3 * D``; with ``dcm=True`` the DEM runs at
that width), read in one pass of the tower. ``select_strategy`` is the model's
``vision_feature_select_strategy``: ``"default"`` (the patch tokens); ``"full"`` keeps prefix tokens, which a
tiling recipe cannot place, so it is taken only for a tower that has none (SigLIP's, where both give the same
tokens) and refused for a CLIP tower (transformers itself fails there: it reshapes each tile's 577 tokens
into a 24 x 24 map).

Options: the keyword arguments of :class:`AnyresFrontEnd` (``pinpoints``: ``(height, width)`` pairs,
multiples of the tile; ``tie_break``, ``newline``, ``dcm``, ``select_strategy``), ``dem``, ``layer`` (default
-2; an int or a list) and the encoder options.

Example::

    >>> import hrperc
    >>> enc = hrperc.create_encoder("llava_next", "timm:vit_tiny_patch16_224")    # 224 px tiles
    >>> plan = enc.plan((480, 640))
    >>> plan.num_tokens, plan.grid, plan.anyres.unpadded                           # base 196 + 22 x (28 + 1)
    (834, (2, 2), (22, 28))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._validation import as_bool, as_int, as_sequence
from ..modules.frontend import FrontEnd, ViewPlan, make_layout
from ..ops import anyres
from ..ops import preprocess as pp
from ..ops.canvas import CropGeometry
from ..ops.crop import local_crop, local_merge, stride_crop
from . import register_recipe
from ._common import as_backbone, build, split_options
from .llava15 import as_select_strategy

__all__ = ["build_llava_next", "AnyresFrontEnd", "AnyresViewPlan", "scaled_pinpoints"]


def scaled_pinpoints(pinpoints, reference_tile: int, tile: int) -> tuple[tuple[int, int], ...]:
    """Pinpoints given for ``reference_tile`` px tiles, for ``tile`` px tiles (``(a*t, b*t)`` stays a grid)."""
    return tuple((h * tile // reference_tile, w * tile // reference_tile) for h, w in pinpoints)


@dataclass(frozen=True)
class AnyresViewPlan(ViewPlan):
    """An anyres image's plan: ``anyres``, its :class:`~hrperc.ops.anyres.AnyresPlan` (canvas, grid,
    unpadded and output map shapes); the views are the base view, the ``gh*gw`` tiles, then (``dcm=True``)
    their strided views; the canvas and the centred content are ``geometry.canvas_size`` / ``valid_box``."""

    anyres: anyres.AnyresPlan


class AnyresFrontEnd(FrontEnd[AnyresViewPlan]):
    """LLaVA-NeXT's anyres views and packing (OneVision's with ``max_tiles``); see :mod:`hrperc.recipes.llava_next`.

    ``max_tiles``: OneVision's ``anyres_max_N`` bilinear shrink of the unpadded map (after ``project``, as
    the model does); ``None`` for LLaVA-NeXT. ``dcm=True``: the strided views of the canvas too, and the
    front end's DEM (``self.dem``, ``reduction="none"``) enhances the tiles' map with them.
    """

    tile_size: tuple[int, int]  # always set: the backbone's tile

    def __init__(
        self,
        tile_size,
        patch_size,
        pinpoints,
        *,
        tie_break: str = "transformers",
        newline: bool = True,
        max_tiles: int | None = None,
        dcm: bool = False,
        select_strategy: str = "default",
        name: str = "llava_next",
    ) -> None:
        super().__init__(tile_size, patch_size)
        th, tw = self.tile_size
        example = f"[({th}, {2 * tw}), ({2 * th}, {tw})]"
        pairs = anyres._pinpoints(as_sequence(pinpoints, "pinpoints", example=example), name="pinpoints")
        bad = [p for p in pairs if p[0] % th or p[1] % tw]
        if bad:
            raise ValueError(
                f"pinpoints {bad} are not multiples of the backbone's {th}x{tw} tile; every pinpoint must be "
                f"a grid of whole tiles, e.g. ({th}, {2 * tw})."
            )
        if tie_break not in anyres.TIE_BREAKS:
            raise ValueError(f"tie_break={tie_break!r} is not one of {anyres.TIE_BREAKS}.")
        if self.tile_tokens[0] != self.tile_tokens[1]:
            raise ValueError(f"the backbone's tiles give {self.tile_tokens} tokens; anyres needs square tiles.")
        if max_tiles is not None:  # None: no shrink (LLaVA-NeXT)
            max_tiles = as_int(max_tiles, "max_tiles", example="max_tiles=9 (OneVision's anyres_max_9) or None")
        self.pinpoints, self.tie_break, self.newline = pairs, tie_break, as_bool(newline, "newline")
        self.max_tiles, self.uses_dem, self.name = max_tiles, as_bool(dcm, "dcm"), name
        self.select_strategy = as_select_strategy(select_strategy)

    def check_backbone(self, backbone) -> None:
        super().check_backbone(backbone)
        prefix = backbone.num_prefix_tokens
        if self.select_strategy == "full" and prefix:
            ht, wt = self.tile_tokens
            raise ValueError(
                f"select_strategy='full' keeps the tower's {prefix} prefix token(s), which {self.name}'s tiles cannot "
                f"hold: each tile must give a {ht} x {wt} map (transformers itself fails here, reshaping "
                f"{prefix + ht * wt} tokens into {ht} x {wt}). Use select_strategy='default' (the patch tokens), or a "
                f"tower without a class token (SigLIP)."
            )

    def plan(self, image_size) -> AnyresViewPlan:
        H, W = image_size
        a = anyres.anyres_plan(
            (H, W),
            self.pinpoints,
            tile_size=self.tile_size,
            patch_size=self.patch_size,
            newline=self.newline,
            tie_break=self.tie_break,
            max_tiles=self.max_tiles,
        )
        (ch, cw), (rh, rw) = a.canvas, anyres.resized_size((H, W), a.canvas)
        geo = CropGeometry(
            (H, W), a.grid, self.tile_size, a.canvas, ((ch - rh) // 2, (cw - rw) // 2, rh, rw), "resize_pad"
        )
        ht, wt = self.tile_tokens
        layout = make_layout(("base", a.base_tokens, (ht, wt)), ("tiles", a.map_tokens, a.shape, self.newline))
        n = a.grid[0] * a.grid[1]
        return AnyresViewPlan((H, W), 1 + n * (1 + self.uses_dem), geo, layout, a)

    def views(self, pixels: torch.Tensor, plan: AnyresViewPlan) -> torch.Tensor:
        b, grid, geo = pixels.shape[0], plan.grid, plan.geometry
        base = pp.resize(pixels, self.tile_size)
        canvas = pp.pad_centred(pp.resize(pixels, geo.valid_box[2:]), geo.canvas_size)
        parts = [base[:, None], local_crop(canvas, grid).unflatten(0, (b, -1))]
        if self.uses_dem:
            parts.append(stride_crop(canvas, grid).unflatten(0, (b, -1)))
        return torch.cat(parts, 1)

    def assemble(self, feats, plan: AnyresViewPlan, *, project=None):
        b, grid, (ht, wt) = feats.shape[0], plan.grid, self.tile_tokens
        n, D = grid[0] * grid[1], feats.shape[-1]
        if self.uses_dem:  # the DEM computes in its own dtype
            feats = self.in_dem_dtype(feats)
        base, tiles = feats[:, 0], feats[:, 1 : 1 + n].flatten(0, 1)
        if self.uses_dem:
            strided = feats[:, 1 + n :].flatten(0, 1)
            fmap = self.held_dem()(tiles, strided, grid, tile_size=(ht, wt)).view(b, grid[0] * ht, grid[1] * wt, D)
        else:
            fmap = local_merge(tiles.view(b * n, ht, wt, D), grid, layout="nhwc")
        if project is not None:
            base, fmap = project(base), project(fmap)
        (rows, cols), (out_rows, out_cols) = plan.anyres.unpadded, plan.anyres.shape
        top, left = (fmap.shape[1] - rows) // 2, (fmap.shape[2] - cols) // 2
        fmap = fmap[:, top : top + rows, left : left + cols]
        if (out_rows, out_cols) != (rows, cols):  # OneVision's anyres_max_N: bilinear, on projected features
            fmap = F.interpolate(fmap.permute(0, 3, 1, 2), (out_rows, out_cols), mode="bilinear").permute(0, 2, 3, 1)
        if self.newline:
            fmap = torch.cat([fmap, fmap.new_zeros(b, out_rows, 1, fmap.shape[-1])], dim=2)
        return torch.cat([base, fmap.flatten(1, 2)], dim=1)

    def extra_repr(self) -> str:
        cap = "" if self.max_tiles is None else f", max_tiles={self.max_tiles}"
        head = f"{super().extra_repr()}, pinpoints={len(self.pinpoints)}, tie_break={self.tie_break!r}"
        return f"{head}{cap}, dcm={self.uses_dem}"


def build_anyres(recipe: str, backbone, options: dict, *, pinpoints, reference_tile: int, **fixed):
    """An anyres recipe: ``options`` split by its spec (:class:`AnyresFrontEnd`'s signature, less what it leaves
    out), its default ``pinpoints`` given for ``reference_tile`` px tiles, ``fixed`` front-end arguments on top."""
    own, enc = split_options(recipe, options)
    bb = as_backbone(backbone, enc["layer"])
    if own.get("pinpoints") is None:  # an empty list is refused by the front end, never read as "the defaults"
        own["pinpoints"] = scaled_pinpoints(pinpoints, reference_tile, bb.image_size[0])
    return build(AnyresFrontEnd(bb.image_size, bb.patch_size, name=recipe, **fixed, **own), bb, enc)


@register_recipe(
    "llava_next",
    front_end=AnyresFrontEnd,
    leave_out=("name", "max_tiles"),
    defaults={"layer": -2},
    notes={"pinpoints": "LLaVA-NeXT's 5 canvases of 336 px tiles, scaled to the backbone's tile"},
)
def build_llava_next(backbone, **options):
    """LLaVA-NeXT's anyres front end around ``backbone`` (see the module docs for the options)."""
    return build_anyres(
        "llava_next",
        backbone,
        options,
        pinpoints=anyres.LLAVA_NEXT_PINPOINTS,
        reference_tile=336,
    )
