"""``llava15``: LLaVA-1.5's front end -- one tile of the whole image, padded to a square with the mean colour.

Exactly ``LlavaImageProcessor(do_pad=True)`` (transformers' default torchvision backend) followed by
``LlavaForConditionalGeneration``'s image features before the projector (layer -2, CLS dropped)::

    image (H, W) --pad to max(H, W) square, colour int(255 * mean), centred--> (S, S)
          --resize to one tile (bicubic, antialias)--> (t, t) --ViT layer -2--> ht*wt tokens

576 tokens for CLIP ViT-L/14-336. ``pad=False`` is the CLIP processor's path instead (LLaVA-1.5 trained
with ``image_aspect_ratio="pad"``, the default here): resize the shortest edge to the tile, then centre-crop.

``select_strategy`` is the model's ``vision_feature_select_strategy``: ``"default"`` returns the patch tokens
(CLIP's class token dropped), ``"full"`` keeps the tower's prefix tokens first -- 577 tokens for CLIP
ViT-L/14-336 (a tower without prefix tokens, SigLIP's, gives its patch tokens either way). ``layer`` may be a
list, the model's list ``vision_feature_layer``: ``layer=[-2, -5, -8]`` concatenates the three layers' tokens
on the channels in that order (``token_width`` ``3 * D``), read in one pass of the tower; a repeated or
out-of-range entry is refused.

Options: ``pad`` (:class:`SquareFrontEnd`'s, default True), ``select_strategy`` (default ``"default"``),
``layer`` (default -2; an int or a list) and the encoder options of :class:`~hrperc.HighResEncoder`
(``max_batch``, ``train_backbone``, ``grad_checkpointing``, ``check_range``).

Example::

    >>> import torch, hrperc
    >>> enc = hrperc.create_encoder("llava15", "timm:vit_tiny_patch16_224")     # random weights
    >>> enc.num_tokens((480, 640)), enc(torch.rand(3, 480, 640)).tokens.shape
    (196, torch.Size([1, 196, 192]))
    >>> full = hrperc.create_encoder("llava15", enc.backbone, select_strategy="full", layer=[-2, -5])
    >>> full.num_tokens((480, 640)), full.token_width                          # the class token kept, 2 layers
    (197, 384)
"""

from __future__ import annotations

import torch

from .._validation import as_bool, as_index
from ..modules.frontend import FrontEnd, ViewPlan, make_layout
from ..ops import preprocess as pp
from ..ops.canvas import CropGeometry
from . import register_recipe
from ._common import as_backbone, build, split_options

__all__ = ["build_llava15", "SquareFrontEnd", "SELECT_STRATEGIES", "as_select_strategy"]

#: transformers' ``vision_feature_select_strategy`` values: the patch tokens, or the prefix tokens too.
SELECT_STRATEGIES = ("default", "full")


def as_select_strategy(value) -> str:
    """``value`` checked as a ``select_strategy`` (one of :data:`SELECT_STRATEGIES`)."""
    if not isinstance(value, str) or value not in SELECT_STRATEGIES:
        raise ValueError(
            f"select_strategy={value!r} is not one of {SELECT_STRATEGIES} (transformers' "
            f"vision_feature_select_strategy). Pass 'default' (the patch tokens) or 'full' (the class token too)."
        )
    return value


class SquareFrontEnd(FrontEnd):
    """One view: pad to a square with ``colour`` (``pad=True``) or centre-crop, resized to one tile.

    ``colour``: the padding in ``[0, 255]`` (LLaVA: ``int(255 * mean)`` of the backbone's mean).
    ``select_strategy="full"``: the backbone's ``prefix_tokens`` (its ``num_prefix_tokens``) come first, before
    the ``ht*wt`` patch tokens (:attr:`keeps_prefix` asks the encoder for them).
    """

    tile_size: tuple[int, int]  # always set: the backbone's tile

    def __init__(
        self,
        tile_size,
        patch_size,
        *,
        pad: bool = True,
        select_strategy: str = "default",
        colour=(0, 0, 0),
        prefix_tokens: int = 0,
    ) -> None:
        super().__init__(tile_size, patch_size)
        self.pad, self.colour = as_bool(pad, "pad"), tuple(int(c) for c in colour)
        self.select_strategy = as_select_strategy(select_strategy)
        n = as_index(prefix_tokens)
        if n is None or n < 0:
            raise ValueError(f"prefix_tokens={prefix_tokens!r}; pass the backbone's num_prefix_tokens (an int >= 0).")
        self.prefix_tokens = n if self.select_strategy == "full" else 0

    @property
    def keeps_prefix(self) -> bool:
        """Whether the views' features come with the backbone's prefix tokens first (``select_strategy="full"``)."""
        return self.select_strategy == "full"

    def check_backbone(self, backbone) -> None:
        super().check_backbone(backbone)
        if self.keeps_prefix and self.prefix_tokens != backbone.num_prefix_tokens:
            raise ValueError(
                f"select_strategy='full' with prefix_tokens={self.prefix_tokens}, but the backbone has "
                f"{backbone.num_prefix_tokens} prefix token(s). Build the front end with "
                f"prefix_tokens={backbone.num_prefix_tokens} (hrperc.create_encoder('llava15', ...) does)."
            )

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
        image = ("image", ht * wt, (ht, wt))
        if self.prefix_tokens:  # transformers' "full": the class token first, then the map
            return ViewPlan((H, W), 1, geo, make_layout(("prefix", self.prefix_tokens, None), image))
        return ViewPlan((H, W), 1, geo, make_layout(image))

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
        full = ", select_strategy='full'" if self.keeps_prefix else ""
        return f"{super().extra_repr()}, pad={self.pad}, colour={self.colour}{full}"


def mean_colour(backbone) -> tuple[int, ...]:
    """LLaVA's padding colour: ``int(255 * mean)`` per channel of the backbone's normalization mean."""
    return tuple(int(m * 255) for m in backbone.mean)


# colour and prefix_tokens: the backbone's (its mean, its class tokens)
@register_recipe("llava15", front_end=SquareFrontEnd, leave_out=("colour", "prefix_tokens"), defaults={"layer": -2})
def build_llava15(backbone, **options):
    """LLaVA-1.5's front end around ``backbone`` (see the module docs for the options)."""
    own, enc = split_options("llava15", options)
    bb = as_backbone(backbone, enc["layer"])
    front_end = SquareFrontEnd(
        bb.image_size, bb.patch_size, colour=mean_colour(bb), prefix_tokens=bb.num_prefix_tokens, **own
    )
    return build(front_end, bb, enc)
