"""``pixtral``: Pixtral's native-resolution front end -- Pixtral-12B (``LlavaForConditionalGeneration`` with a
Pixtral tower) and Mistral 3 (``Mistral3ForConditionalGeneration``), one view of the image's own size, packed.

Exactly ``PixtralProcessor`` (its ``PixtralImageProcessor``, transformers' default torchvision backend)
followed by the model's ``get_image_features``, around the model's own vision tower::

    image (H, W) --pixtral_resize: scaled down to longest_edge, sides rounded up to P = patch * merge_size--> (h, w)
          --resize (bicubic, antialias, uint8 kept)--> one view (3, h, w)
          --tower, EVERY view of the batch in one packed pass, attention per image--> (h/p, w/p) patch features
          --merged cells (rows, cols) = (h/P, w/P), a slot after each row--> rows * (cols + 1) tokens

**Tokens and slots.** The processor writes, per image, ``rows`` rows of ``cols`` ``[IMG]`` each followed by
``[IMG_BREAK]``, the last row's break being ``[IMG_END]``: ``rows * (cols + 1)`` tokens
(:func:`hrperc.ops.native.pixtral_num_tokens`), what :meth:`~hrperc.HighResEncoder.num_tokens` returns.
The encoder's tokens are laid out the same way: the ``[IMG]`` positions hold features, the
``[IMG_BREAK]`` / ``[IMG_END]`` positions are newline slots (zeros, ``EncoderOutput.slot_mask``; the model
embeds those two tokens itself, so only ``tokens[~slot_mask]`` -- per image, its ``[IMG]`` features in
raster order -- go to the model).

**Merge.** Pixtral-12B (``merge_size=1``) gives one ``[IMG]`` per patch: a token is the tower's patch
feature (width ``D``). Mistral 3 (``merge_size=2``) merges each ``2 x 2`` block of patches into one
``[IMG]`` inside its projector (RMSNorm of every patch, the patch merger's unfold and linear layer, then
the MLP), so here a token of a merged cell is its ``m x m`` patch features concatenated on the channels,
patch-major: channel ``(i * m + j) * D + c`` is channel ``c`` of the patch at row ``i``, column ``j`` of the
cell (width ``m * m * D``, :attr:`~hrperc.HighResEncoder.token_width`). ``project=`` the model's
projector gives the LLM's tokens for both models: ``enc(images, project=model.model.multi_modal_projector)``
applies LLaVA's projector per token, and Mistral 3's through :class:`MergedProjector` (taken
automatically for a ``Mistral3MultiModalProjector``), which normalizes, merges and projects each cell as
the model does. The slots stay zeros after ``project``.

Options: ``longest_edge`` (default: 1024, Pixtral-12B's processor; with ``merge_size=2``, 1540,
Mistral-Small-3.1's), ``merge_size`` (1: Pixtral-12B; 2: Mistral 3, the model config's
``spatial_merge_size``), ``reading`` (``"transformers"``, the default, or ``"mistral_common"``: Mistral's
own tokenizer's sizes, which round where transformers floors; :mod:`hrperc.ops.native` says on which sizes
they differ -- the pixels are resized with transformers' antialiased bicubic in both) and the encoder
options (``layer``: the model's ``vision_feature_layer``, default -1; ``train_backbone``,
``grad_checkpointing``, ``check_range``). ``backbone`` is the model's ``vision_tower`` (a
``PixtralVisionModel``) or a :class:`~hrperc.backbones.pixtral.PixtralBackbone`. LLaVA needs
``vision_feature_select_strategy="full"`` (Pixtral has no class token; ``"default"`` would drop the
first patch, and the model's own count would then be wrong).

``dcm=True`` (and ``dcm_grid``, default ``(2, 2)``) adds INF-LLaVA's strided global views of the same
resized image and a DEM (``dem=``, default a fresh one, ``reduction="none"``) that enhances the tower's
patch map before the merge; the count and the layout stay (:mod:`hrperc.modules.native_dcm`,
``docs/recipes.md``).

Example::

    >>> import torch, hrperc
    >>> from transformers import PixtralVisionConfig, PixtralVisionModel
    >>> config = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    ...                              head_dim=16, patch_size=16)
    >>> enc = hrperc.create_encoder("pixtral", PixtralVisionModel(config).eval())   # Pixtral-12B's sizes
    >>> enc.num_tokens((768, 1500)), enc.num_tokens((19, 1149)), enc.num_tokens((1, 1))
    (2145, 65, 2)
    >>> out = enc([torch.randint(0, 256, (3, 40, 70), dtype=torch.uint8), torch.rand(3, 20, 20)])
    >>> out.num_tokens, out.tokens.shape, out.slot_mask[0].nonzero().flatten().tolist()   # 3 rows of 5 [IMG] + 1
    ([18, 6], torch.Size([2, 18, 32]), [5, 11, 17])
    >>> m3 = hrperc.create_encoder("pixtral", PixtralVisionModel(config).eval(), merge_size=2, longest_edge=224)
    >>> m3.num_tokens((40, 70)), m3.token_width           # (64, 96) px: 2 x 3 cells of 2 x 2 patches
    (8, 128)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._errors import public
from .._validation import as_int
from ..backbones.pixtral import PixtralBackbone
from ..modules.frontend import FrontEnd, ViewPlan, make_layout
from ..modules.native_dcm import NativeDualPerspective
from ..ops import native
from ..ops import preprocess as pp
from ..ops.canvas import CropGeometry
from . import register_recipe
from ._common import build, split_options

__all__ = ["build_pixtral", "PixtralFrontEnd", "PixtralPlan", "MergedProjector"]


@dataclass(frozen=True)
class PixtralPlan(ViewPlan):
    """One image: resized to ``resized = (h, w)``; ``layout[0].shape`` is its ``(rows, cols)`` of merged cells;
    with ``dcm=True`` also ``global_cells = (Rv, Cv)``, the cells per side of each strided global view."""

    resized: tuple[int, int]
    global_cells: tuple[int, int] | None = None


class MergedProjector(nn.Module):
    """Mistral 3's projector (``Mistral3MultiModalProjector``) as a per-token map of the ``pixtral`` recipe's
    merged tokens: ``(..., m * m * D)`` -> ``(..., D_llm)``, exactly the model's computation on each cell.

    The model normalizes every patch (RMSNorm over ``D``), gathers each ``m x m`` cell with ``unfold``
    (channel-major: feature ``c * m * m + i * m + j``), applies the merging layer, then the MLP. A token
    here is the cell's patches concatenated patch-major (see the module docs); the map normalizes each of
    its ``m * m`` patches and transposes to the unfold order before the model's layers.
    """

    projector: Any  # a transformers module: its attributes are the model's, not nn.Module's

    @public(name="MergedProjector")
    def __init__(self, projector: nn.Module, merge_size: int) -> None:
        super().__init__()
        merger = getattr(projector, "patch_merger", None)
        parts = ("norm", "linear_1", "act", "linear_2")
        if not isinstance(projector, nn.Module) or merger is None or not all(hasattr(projector, a) for a in parts):
            raise TypeError(
                f"projector={type(projector).__name__}; expected Mistral 3's multi_modal_projector (norm, "
                f"patch_merger, linear_1, act, linear_2). Pass model.model.multi_modal_projector of a "
                f"Mistral3ForConditionalGeneration; LLaVA's projector is per token already (pass it as project=)."
            )
        m = as_int(merge_size, "merge_size", example="merge_size=2")
        got = int(getattr(merger, "spatial_merge_size", m))
        if got != m:
            raise ValueError(
                f"merge_size={m}, but the projector merges {got} x {got} patches (its spatial_merge_size). Use an "
                f"encoder built with merge_size={got}: create_encoder('pixtral', tower, merge_size={got})."
            )
        self.projector, self.merge_size = projector, m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pj, u = self.projector, self.merge_size * self.merge_size
        x = pj.norm(x.unflatten(-1, (u, x.shape[-1] // u)))  # every patch's RMSNorm, before the merge as the model
        x = x.transpose(-1, -2).flatten(-2)  # patch-major -> the unfold's channel-major order
        x = pj.patch_merger.merging_layer(x)
        return pj.linear_2(pj.act(pj.linear_1(x)))


def _token_map(project, merge_size: int):
    """``project`` as a per-token map: Mistral 3's projector (it holds a ``patch_merger``) wrapped."""
    if isinstance(project, nn.Module) and not isinstance(project, MergedProjector) and hasattr(project, "patch_merger"):
        return MergedProjector(project, merge_size)
    return project


class PixtralFrontEnd(NativeDualPerspective, FrontEnd[PixtralPlan]):
    """One view of the image resized as ``PixtralProcessor`` resizes it; tokens in its ``[IMG]`` /
    ``[IMG_BREAK]`` / ``[IMG_END]`` layout (see the module docs). ``dcm`` / ``dcm_grid``: INF-LLaVA's
    global views and DEM on the tower's patch map, before the merge (:mod:`hrperc.modules.native_dcm`)."""

    def __init__(
        self,
        tile_size,
        patch_size,
        *,
        longest_edge: int | None = None,
        merge_size: int = 1,
        reading: str = "transformers",
        dcm: bool = False,
        dcm_grid=(2, 2),
    ) -> None:
        super().__init__(None, patch_size)  # no fixed tile: every image has its own view size
        self._init_dcm(dcm, dcm_grid)
        m = as_int(merge_size, "merge_size", example="merge_size=1 (Pixtral-12B) or merge_size=2 (Mistral 3)")
        default = native.MISTRAL3_LONGEST_EDGE if m == native.MISTRAL3_MERGE_SIZE else native.PIXTRAL_LONGEST_EDGE
        edge = (
            default if longest_edge is None else as_int(longest_edge, "longest_edge", example=f"longest_edge={default}")
        )
        p = self.patch_size[0]
        if edge < p * m:
            raise ValueError(
                f"longest_edge={edge} is under one merged patch, patch * merge_size = {p} * {m} = {p * m} pixels. "
                f"Pass longest_edge >= {p * m}, e.g. longest_edge={default} (the released processor's)."
            )
        self.patch, self.merge_size, self.longest_edge = p, m, edge
        self.reading = reading
        native.pixtral_resize((64, 64), **self._sizing())  # the reading, checked once here

    def _sizing(self) -> dict:
        return dict(
            longest_edge=self.longest_edge, patch_size=self.patch, merge_size=self.merge_size, reading=self.reading
        )

    def plan(self, image_size) -> PixtralPlan:
        h, w = native.pixtral_resize(image_size, **self._sizing())
        unit = self.patch * self.merge_size
        rows, cols = h // unit, w // unit
        geo = CropGeometry(tuple(image_size), (1, 1), (h, w), (h, w), (0, 0, h, w))
        layout = make_layout(("image", rows * (cols + 1), (rows, cols), True))
        cells = self.dcm_cells((rows, cols))
        views = 1 if cells is None else 1 + self.dcm_grid[0] * self.dcm_grid[1]
        return PixtralPlan(tuple(image_size), views, geo, layout, (h, w), cells)

    def views(self, pixels: torch.Tensor, plan: PixtralPlan):
        resized = pp.resize(pixels, plan.resized)  # uint8 stays uint8: the processor's rounding
        if plan.global_cells is None:
            return resized[:, None]
        return resized[:, None], self.global_views(resized, plan.global_cells, self.patch * self.merge_size)

    def token_width(self, width: int) -> int:
        return width * self.merge_size * self.merge_size

    def assemble(self, feats, plan, *, project=None):
        native = feats[0] if isinstance(feats, tuple) else feats
        b, d, m = native.shape[0], native.shape[-1], self.merge_size
        rows, cols = plan.layout[0].shape
        x = native[:, 0].view(b, rows * m, cols * m, d)  # the tower's patch map
        if plan.global_cells is not None:  # the DEM enhances the patch map, before the merge; the layout stays
            rv, cv = plan.global_cells
            x = self.enhance(x, feats[1], (rv * m, cv * m))
        if m > 1:  # each m x m cell's patches on the channels, patch-major
            x = x.reshape(b, rows, m, cols, m, d).permute(0, 1, 3, 2, 4, 5).reshape(b, rows, cols, m * m * d)
        if project is not None:
            x = _token_map(project, m)(x)
        x = torch.cat([x, x.new_zeros(b, rows, 1, x.shape[-1])], dim=2)  # [IMG_BREAK] / [IMG_END] slots
        return x.view(b, rows * (cols + 1), x.shape[-1])

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, longest_edge={self.longest_edge}, merge_size={self.merge_size}, "
            f"reading={self.reading!r}{self.dcm_repr()}"
        )


@register_recipe(
    "pixtral",
    front_end=PixtralFrontEnd,
    defaults={"layer": -1},
    notes={
        "longest_edge": f"by merge_size: {native.PIXTRAL_LONGEST_EDGE} (Pixtral-12B), "
        f"{native.MISTRAL3_LONGEST_EDGE} with merge_size={native.MISTRAL3_MERGE_SIZE} (Mistral 3)"
    },
)
def build_pixtral(backbone, **options):
    """Pixtral-12B's / Mistral 3's front end around its vision tower (see the module docs for the options)."""
    own, enc = split_options("pixtral", options)
    bb = backbone if isinstance(backbone, PixtralBackbone) else PixtralBackbone(backbone, layer=enc["layer"])
    return build(PixtralFrontEnd(None, bb.patch_size, **own), bb, enc)
