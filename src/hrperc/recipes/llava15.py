"""``llava15``: LLaVA-1.5's front end -- one tile of the whole image, padded to a square with the mean colour.

Exactly ``LlavaImageProcessor(do_pad=True)`` (transformers' default torchvision backend) followed by
``LlavaForConditionalGeneration``'s image features before the projector (layer -2, CLS dropped)::

    image (H, W) --pad to max(H, W) square, colour int(255 * mean), centred--> (S, S)
          --resize to one tile (bicubic, antialias)--> (t, t) --ViT layer -2--> ht*wt tokens

576 tokens for CLIP ViT-L/14-336. ``pad=False`` is the CLIP processor's path instead (LLaVA-1.5 trained
with ``image_aspect_ratio="pad"``, the default here): resize the shortest edge to the tile, then centre-crop.

Options: ``pad`` (:class:`SquareFrontEnd`'s, default True), ``layer`` (default -2) and the encoder options of
:class:`~hrperc.HighResEncoder` (``max_batch``, ``train_backbone``, ``grad_checkpointing``, ``check_range``).

Example::

    >>> import torch, hrperc
    >>> enc = hrperc.create_encoder("llava15", "timm:vit_tiny_patch16_224")     # random weights
    >>> enc.num_tokens((480, 640)), enc(torch.rand(3, 480, 640)).tokens.shape
    (196, torch.Size([1, 196, 192]))
"""

from __future__ import annotations

import torch

from .._validation import as_bool
from ..modules.frontend import FrontEnd, ViewPlan, make_layout
from ..ops import preprocess as pp
from ..ops.canvas import CropGeometry
from . import register_recipe
from ._common import as_backbone, build, options_of, split_options

__all__ = ["build_llava15", "SquareFrontEnd"]


class SquareFrontEnd(FrontEnd):
    """One view: pad to a square with ``colour`` (``pad=True``) or centre-crop, resized to one tile.

    ``colour``: the padding in ``[0, 255]`` (LLaVA: ``int(255 * mean)`` of the backbone's mean).
    """

    tile_size: tuple[int, int]  # always set: the backbone's tile

    def __init__(self, tile_size, patch_size, *, pad: bool = True, colour=(0, 0, 0)) -> None:
        super().__init__(tile_size, patch_size)
        self.pad, self.colour = as_bool(pad, "pad"), tuple(int(c) for c in colour)

    def plan(self, image_size) -> ViewPlan:
        H, W = image_size
        th, tw = self.tile_size
        ht, wt = self.tile_tokens
        if self.pad:
            side = max(H, W)
            top, left = (side - H) // 2, (side - W) // 2
            box = (
                round(top * th / side),
                round(left * tw / side),
                max(1, round(H * th / side)),
                max(1, round(W * tw / side)),
            )
            fit = "pad"
        else:
            box, fit = (0, 0, th, tw), "crop"
        geo = CropGeometry((H, W), (1, 1), (th, tw), (th, tw), box, fit)
        return ViewPlan((H, W), 1, geo, make_layout(("image", ht * wt, (ht, wt))))

    def views(self, pixels: torch.Tensor, plan: ViewPlan) -> torch.Tensor:
        if self.pad:
            square = pp.resize(pp.pad_to_square(pixels, self.colour), self.tile_size)
        else:
            edge = min(self.tile_size)
            square = pp.center_crop(pp.resize(pixels, pp.shortest_edge_size(pixels.shape[-2:], edge)), self.tile_size)
        return square[:, None]

    def assemble(self, feats, plan, *, project=None):
        tokens = feats[:, 0]
        return tokens if project is None else project(tokens)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pad={self.pad}, colour={self.colour}"


def mean_colour(backbone) -> tuple[int, ...]:
    """LLaVA's padding colour: ``int(255 * mean)`` per channel of the backbone's normalization mean."""
    return tuple(int(m * 255) for m in backbone.mean)


@register_recipe("llava15")
def build_llava15(backbone, **options):
    """LLaVA-1.5's front end around ``backbone`` (see the module docs for the options)."""
    own, enc = split_options("llava15", options, options_of(SquareFrontEnd, leave_out=("colour",)))
    enc.setdefault("layer", -2)
    bb = as_backbone(backbone, enc["layer"])
    return build(SquareFrontEnd(bb.image_size, bb.patch_size, colour=mean_colour(bb), **own), bb, enc)
