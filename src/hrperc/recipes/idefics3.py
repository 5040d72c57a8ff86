"""``idefics3``: Idefics3's image splitting -- the longest edge resized, tiles of the tower's size plus a global
image, the connector's pixel shuffle (``smolvlm``, :mod:`hrperc.recipes.smolvlm`, is the same front end with
SmolVLM's defaults).

Exactly ``Idefics3ImageProcessor`` / ``SmolVLMImageProcessor`` (transformers' default torchvision backend, one
code) followed by the models' ``get_image_features`` up to the connector's projection::

    image (H, W) --LANCZOS: longest side to longest_edge (default 4 tiles)--> (h1, w1)
          --LANCZOS: both sides rounded up to multiples of the tile t--> (H2, W2)     (hrperc.ops.idefics)
          --> rows x cols tiles of t x t, row-major, + the global image ((H2, W2) resized to (t, t));
              one view ((h1, w1) resized to (t, t)) when (H2, W2) is one tile or do_image_splitting=False
          --tower: the last block through post_layernorm (layer -1)--> per view (t/p, t/p, D)
          --pixel shuffle by scale_factor s: each s x s block of tokens into one of s*s*D channels-->
            (t/p/s)**2 tokens per view: image_seq_len (169 for Idefics3's 364 / 14 / 2)

The resizes are LANCZOS in uint8 (``resample="lanczos"``, the processors'; torchvision's CPU kernel, so a
view on a GPU is resized on the CPU and moved back, as the processors would compute it), each rounded to
uint8 before the next, as the processors chain them. The pixel shuffle is the connector's own
(``Idefics3Connector.pixel_shuffle``): token ``(i, j)`` holds the block at rows ``s*i + di``, columns
``s*j + dj``, channels in ``(di, dj, d)`` order, width ``s*s*D`` (:attr:`~hrperc.HighResEncoder.token_width`).
``project=`` is the connector's projection, ``model.model.connector.modality_projection``, applied per
token as the model does; the LLM's tokens are then exactly ``get_image_features``' ``pooler_output``.

**Layout and text.** ``num_tokens`` counts the ``<image>`` tokens, ``(rows * cols + 1) * image_seq_len``
(or ``image_seq_len``), the count the processor writes. The layout has one run per view, named as the
processor's markers: ``"row_<r>_col_<c>"`` for the tiles (1-based), then ``"global"``, each a
``(t/p/s, t/p/s)`` map; :func:`hrperc.ops.idefics.layout_prompt` writes the processor's text from it
(``<fake_token_around_image><row_r_col_c><image>...``, a newline after each row, ``<global-img>``), which is
how the attached processor of :mod:`hrperc.integrations.transformers` writes the original prompt.

``dcm=True`` adds INF-LLaVA's strided views of the ``(H2, W2)`` canvas and the DEM (``dem=``, default a fresh
one with ``reduction="none"``), whose enhanced map is cut back into the tiles before the shuffle (a one-view
image is a 1 x 1 grid; the global image is kept as it is): the same views, layout and count.

Options: the keyword arguments of :class:`IdeficsFrontEnd` -- ``longest_edge`` (default ``4 * t``, the
processors' ``size["longest_edge"]``), ``scale_factor`` (the model config's; 2 here, 4 for ``smolvlm``),
``do_image_splitting`` (True), ``resample`` (``"lanczos"`` or ``"bicubic"``), ``dcm`` -- ``dem``, ``layer``
(default -1) and the encoder options. ``backbone``: the model's ``vision_model`` (an
``Idefics3VisionTransformer`` / ``SmolVLMVisionTransformer``, wrapped as
:class:`~hrperc.backbones.idefics.IdeficsBackbone`), or any fixed-size ViT backbone.

Example::

    >>> import torch, hrperc
    >>> from transformers import Idefics3VisionConfig
    >>> from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer
    >>> cfg = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                            num_attention_heads=2, image_size=56, patch_size=14)
    >>> enc = hrperc.create_encoder("idefics3", Idefics3VisionTransformer(cfg).eval())   # 56 px tiles, 4 tokens
    >>> plan = enc.plan((480, 640))
    >>> plan.grid, enc.num_tokens((480, 640)), [s.source for s in plan.layout][:2], plan.layout[-1].source
    ((3, 4), 52, ['row_1_col_1', 'row_1_col_2'], 'global')
    >>> enc(torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8)).tokens.shape       # width 4 * 32
    torch.Size([1, 52, 128])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms.v2 import functional as tvF

from .._validation import as_bool, as_int
from ..backbones.base import VisionBackbone
from ..backbones.idefics import IdeficsBackbone, held_tower, is_idefics_tower
from ..modules.frontend import FrontEnd, ViewPlan, make_layout
from ..ops import idefics
from ..ops.canvas import CropGeometry
from ..ops.crop import local_crop, stride_crop
from . import register_recipe
from ._common import as_backbone, build, split_options
from .internvl import pixel_shuffle

__all__ = ["build_idefics3", "build_idefics", "IdeficsFrontEnd", "IdeficsPlan", "RESAMPLES"]

#: ``resample`` -> torchvision's mode: the processors' LANCZOS (their default), or bicubic.
RESAMPLES = {"lanczos": tvF.InterpolationMode.LANCZOS, "bicubic": tvF.InterpolationMode.BICUBIC}


@dataclass(frozen=True)
class IdeficsPlan(ViewPlan):
    """One image: ``tiled`` -- ``rows x cols`` tiles (``geometry.grid``) and the global image; else one view
    (``geometry.grid`` is ``(1, 1)``). The views are the tiles, the global image, then (``dcm=True``) the
    tiles' strided views; ``geometry.canvas_size`` is the ``(H2, W2)`` image cut into the tiles."""

    tiled: bool


class IdeficsFrontEnd(FrontEnd[IdeficsPlan]):
    """Idefics3's / SmolVLM's tiles + global image + pixel shuffle (see :mod:`hrperc.recipes.idefics3`)."""

    tile_size: tuple[int, int]  # always set: the backbone's tile

    def __init__(
        self,
        tile_size,
        patch_size,
        *,
        longest_edge: int | None = None,
        scale_factor: int = 2,
        do_image_splitting: bool = True,
        resample: str = "lanczos",
        dcm: bool = False,
        name: str = "idefics3",
    ) -> None:
        super().__init__(tile_size, patch_size)
        (th, tw), (ht, wt) = self.tile_size, self.tile_tokens
        if th != tw or ht != wt:
            raise ValueError(
                f"the backbone's tiles are {th}x{tw} px ({ht}x{wt} tokens); the {name} recipe needs square tiles "
                f"of a square token grid (the connector's pixel shuffle reads a square). Use a backbone with square "
                f"tiles, e.g. the model's own vision_model."
            )
        s = as_int(scale_factor, "scale_factor", example=f"scale_factor=2 (Idefics3) or 4 (SmolVLM on {th} px tiles)")
        if ht % s:
            fits = [f for f in range(1, ht + 1) if ht % f == 0]
            raise ValueError(
                f"scale_factor={s} does not divide the tile's {ht}x{ht} token grid ({th} px tiles of "
                f"{self.patch_size[0]} px patches): the pixel shuffle takes {s}x{s} blocks. Pass a scale_factor "
                f"among {fits}, or a backbone whose grid it divides (SmolVLM's scale 4: 512 px tiles of 16 px patches)."
            )
        edge = (
            4 * th if longest_edge is None else as_int(longest_edge, "longest_edge", example=f"longest_edge={4 * th}")
        )
        if not isinstance(resample, str) or resample not in RESAMPLES:
            raise ValueError(
                f"resample={resample!r} is not one of {tuple(RESAMPLES)}. Pass resample='lanczos' (the processors' "
                f"default) or 'bicubic'."
            )
        self.longest_edge, self.scale_factor, self.resample = edge, s, resample
        self.splitting, self.uses_dem, self.name = (
            as_bool(do_image_splitting, "do_image_splitting"),
            as_bool(dcm, "dcm"),
            name,
        )

    @property
    def image_seq_len(self) -> int:
        """Tokens per view: ``(t / p / scale_factor)**2``."""
        return (self.tile_tokens[0] // self.scale_factor) ** 2

    def token_width(self, width: int) -> int:
        return width * self.scale_factor**2

    def plan(self, image_size) -> IdeficsPlan:
        t = self.tile_size[0]
        rows, cols = idefics._tile_grid(image_size, self.longest_edge, t, self.splitting)
        k = self.tile_tokens[0] // self.scale_factor
        runs = [(idefics.tile_source(r, c), k * k, (k, k)) for r in range(rows) for c in range(cols)]
        runs.append(("global", k * k, (k, k)))
        tiled = rows > 0
        grid = (rows, cols) if tiled else (1, 1)
        canvas = (rows * t, cols * t) if tiled else (t, t)
        geo = CropGeometry(tuple(image_size), grid, (t, t), canvas, (0, 0, *canvas), "resize")
        n = grid[0] * grid[1]
        views = n + tiled + (n if self.uses_dem else 0)
        return IdeficsPlan(tuple(image_size), views, geo, make_layout(*runs), tiled)

    def _resize(self, img: torch.Tensor, size) -> torch.Tensor:
        """torchvision's resize with the processors' filter, uint8 kept (an image of ``size`` is returned)."""
        if tuple(img.shape[-2:]) == tuple(size):
            return img
        mode = RESAMPLES[self.resample]
        if mode == tvF.InterpolationMode.LANCZOS and img.device.type != "cpu":  # torchvision's kernel is the CPU's
            return tvF.resize(img.cpu(), list(size), interpolation=mode, antialias=True).to(img.device)
        return tvF.resize(img, list(size), interpolation=mode, antialias=True)

    def views(self, pixels: torch.Tensor, plan: IdeficsPlan) -> torch.Tensor:
        b, grid, t = pixels.shape[0], plan.grid, self.tile_size[0]
        first = self._resize(pixels, idefics._resize_longest_edge(plan.image_size, self.longest_edge))
        if plan.tiled:  # the processors' chain: (h1, w1) -> (H2, W2) -> tiles, and the global image from (H2, W2)
            canvas = self._resize(first, plan.canvas_size)
            parts = [local_crop(canvas, grid).unflatten(0, (b, -1)), self._resize(canvas, (t, t))[:, None]]
        else:
            canvas = self._resize(first, (t, t))
            parts = [canvas[:, None]]
        if self.uses_dem:
            parts.append(stride_crop(canvas, grid).unflatten(0, (b, -1)))
        return torch.cat(parts, 1)

    def assemble(self, feats, plan: IdeficsPlan, *, project=None):
        b, grid, (ht, wt) = feats.shape[0], plan.grid, self.tile_tokens
        n, D = grid[0] * grid[1], feats.shape[-1]
        own = feats[:, : n + plan.tiled]
        if self.uses_dem:  # the DEM computes in its own dtype; its map is cut back into the tiles
            feats = self.in_dem_dtype(feats)
            tiles, strided = feats[:, :n].flatten(0, 1), feats[:, n + plan.tiled :].flatten(0, 1)
            fmap = self.held_dem()(tiles, strided, grid, tile_size=(ht, wt))  # (b, gh*ht*gw*wt, D) row-major map
            enhanced = local_crop(fmap, grid, layout="nlc", size=(grid[0] * ht, grid[1] * wt)).unflatten(0, (b, n))
            own = torch.cat([enhanced, feats[:, n : n + plan.tiled]], 1)
        views = own.shape[1]
        shuffled = pixel_shuffle(own.reshape(b * views, ht, wt, D), self.scale_factor).flatten(1, 2)
        tokens = shuffled.reshape(b, views * shuffled.shape[1], shuffled.shape[-1])
        return tokens if project is None else project(tokens)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, longest_edge={self.longest_edge}, scale_factor={self.scale_factor}, "
            f"do_image_splitting={self.splitting}, resample={self.resample!r}, dcm={self.uses_dem}"
        )


#: An Idefics3-style recipe's registration, less its ``scale_factor`` (the model config's).
IDEFICS_SPEC: dict[str, Any] = dict(
    front_end=IdeficsFrontEnd,
    leave_out=("name",),
    notes={"longest_edge": "4 tiles' side (the processors' size['longest_edge'])"},
)


def build_idefics(recipe: str, backbone, options: dict):
    """An Idefics3-style recipe: ``options`` split by its spec (:class:`IdeficsFrontEnd`'s signature, the recipe's
    ``scale_factor``); the model's tower is wrapped as :class:`IdeficsBackbone`, any other by ``wrap_backbone``."""
    own, enc = split_options(recipe, options)
    bb: VisionBackbone
    if isinstance(backbone, IdeficsBackbone):
        bb = backbone
    elif is_idefics_tower(backbone) or held_tower(backbone) is not None:  # a full model: refused, its tower named
        bb = IdeficsBackbone(backbone, layer=enc["layer"])
    else:
        bb = as_backbone(backbone, enc["layer"])
    return build(IdeficsFrontEnd(bb.image_size, bb.patch_size, name=recipe, **own), bb, enc)


@register_recipe("idefics3", **IDEFICS_SPEC, defaults={"layer": -1, "scale_factor": 2})
def build_idefics3(backbone, **options):
    """Idefics3's front end around ``backbone`` (see the module docs for the options)."""
    return build_idefics("idefics3", backbone, options)
