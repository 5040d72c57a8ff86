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

Options: ``pinpoints`` (``(height, width)`` pairs, multiples of the tile), ``tie_break``, ``newline``
(default True), ``dcm``, ``dem``, ``layer`` (default -2) and the encoder options.

Example::

    >>> import hrperc
    >>> enc = hrperc.create_encoder("llava_next", "timm:vit_tiny_patch16_224")    # 224 px tiles
    >>> enc.num_tokens((480, 640)), enc.view_plan((480, 640)).grid
    (834, (2, 2))
"""

from __future__ import annotations

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

__all__ = ["build_llava_next", "AnyresFrontEnd", "scaled_pinpoints"]


def scaled_pinpoints(pinpoints, reference_tile: int, tile: int) -> tuple[tuple[int, int], ...]:
    """Pinpoints given for ``reference_tile`` px tiles, for ``tile`` px tiles (``(a*t, b*t)`` stays a grid)."""
    return tuple((h * tile // reference_tile, w * tile // reference_tile) for h, w in pinpoints)


class AnyresFrontEnd(FrontEnd):
    """LLaVA-NeXT's anyres views and packing (OneVision's with ``max_tiles``); see :mod:`hrperc.recipes.llava_next`.

    ``max_tiles``: OneVision's ``anyres_max_N`` bilinear shrink of the unpadded map (after ``project``, as
    the model does); ``None`` for LLaVA-NeXT.
    """

    def __init__(self, tile_size, patch_size, pinpoints, *, tie_break: str = "transformers", newline: bool = True,
                 max_tiles: int | None = None, dcm: bool = False, name: str = "llava_next") -> None:  # fmt: skip
        super().__init__(tile_size, patch_size)
        fn = f"create_encoder({name!r})"
        th, tw = self.tile_size
        example = f"[({th}, {2 * tw}), ({2 * th}, {tw})]"
        pairs = anyres._pinpoints(as_sequence(pinpoints, "pinpoints", fn, example), fn, name="pinpoints")
        bad = [p for p in pairs if p[0] % th or p[1] % tw]
        if bad:
            raise ValueError(
                f"{fn}: pinpoints {bad} are not multiples of the backbone's {th}x{tw} tile; every pinpoint must be "
                f"a grid of whole tiles, e.g. ({th}, {2 * tw})."
            )
        if tie_break not in anyres.TIE_BREAKS:
            raise ValueError(f"{fn}: tie_break={tie_break!r} is not one of {anyres.TIE_BREAKS}.")
        if self.tile_tokens[0] != self.tile_tokens[1]:
            raise ValueError(f"{fn}: the backbone's tiles give {self.tile_tokens} tokens; anyres needs square tiles.")
        if max_tiles is not None:  # None: no shrink (LLaVA-NeXT)
            max_tiles = as_int(max_tiles, "max_tiles", fn, example="max_tiles=9 (OneVision's anyres_max_9) or None")
        self.pinpoints, self.tie_break, self.newline = pairs, tie_break, as_bool(newline, "newline", fn)
        self.max_tiles, self.uses_dem, self.name = max_tiles, as_bool(dcm, "dcm", fn), name

    def plan(self, image_size) -> ViewPlan:
        H, W = (int(v) for v in image_size)
        (th, tw), (ht, wt) = self.tile_size, self.tile_tokens
        canvas = anyres.select_resolution((H, W), self.pinpoints, tie_break=self.tie_break)
        gh, gw = canvas[0] // th, canvas[1] // tw
        rh, rw = anyres.resized_size((H, W), canvas)
        rows, cols = anyres.unpadded_shape((H, W), (gh * ht, gw * wt))
        out = rows, cols
        if self.max_tiles is not None:
            out = anyres.shrunk_shape(out, (ht, wt), self.max_tiles)
        n = gh * gw
        geo = CropGeometry((H, W), (gh, gw), (th, tw), canvas, ((canvas[0] - rh) // 2, (canvas[1] - rw) // 2, rh, rw),
                           "resize_pad")  # fmt: skip
        map_tokens = out[0] * (out[1] + self.newline)
        layout = make_layout(("base", ht * wt, (ht, wt)), ("tiles", map_tokens, out, self.newline))
        key = (gh, gw, rows, cols, *out)
        return ViewPlan((H, W), 1 + n * (1 + self.uses_dem), geo, layout, key, info=(canvas, (rh, rw), (rows, cols)))

    def views(self, pixels: torch.Tensor, plan: ViewPlan) -> torch.Tensor:
        b, grid = pixels.shape[0], plan.grid
        canvas_size, content = plan.info[0], plan.info[1]
        base = pp.resize(pixels, self.tile_size)
        canvas = pp.pad_centred(pp.resize(pixels, content), canvas_size)
        parts = [base[:, None], local_crop(canvas, grid).unflatten(0, (b, -1))]
        if self.uses_dem:
            parts.append(stride_crop(canvas, grid).unflatten(0, (b, -1)))
        return torch.cat(parts, 1)

    def assemble(self, feats, plan, *, dem=None, project=None):
        b, grid, (ht, wt) = feats.shape[0], plan.grid, self.tile_tokens
        n, D = grid[0] * grid[1], feats.shape[-1]
        base, tiles = feats[:, 0], feats[:, 1 : 1 + n].flatten(0, 1)
        if self.uses_dem:
            strided = feats[:, 1 + n :].flatten(0, 1)
            fmap = dem(tiles, strided, grid, tile_size=(ht, wt)).view(b, grid[0] * ht, grid[1] * wt, D)
        else:
            fmap = local_merge(tiles.view(b * n, ht, wt, D), grid, layout="nhwc")
        if project is not None:
            base, fmap = project(base), project(fmap)
        _, _, rows, cols, out_rows, out_cols = plan.key
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


_OWN = ("pinpoints", "tie_break", "newline", "dcm", "dem")


@register_recipe("llava_next")
def build_llava_next(backbone, **options):
    """LLaVA-NeXT's anyres front end around ``backbone`` (see the module docs for the options)."""
    own, enc = split_options("llava_next", options, _OWN)
    bb = as_backbone(backbone, enc.get("layer", -2))
    pinpoints = own.get("pinpoints")  # an empty list is refused by the front end, never read as "the defaults"
    if pinpoints is None:
        pinpoints = scaled_pinpoints(anyres.LLAVA_NEXT_PINPOINTS, 336, bb.image_size[0])
    fe = AnyresFrontEnd(bb.image_size, bb.patch_size, pinpoints, tie_break=own.get("tie_break", "transformers"),
                        newline=own.get("newline", True), dcm=own.get("dcm", False))  # fmt: skip
    return build(fe, bb, own.get("dem", "default"), -2, enc)
