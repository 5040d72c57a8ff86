"""INF-LLaVA's dual perspectives on a native-resolution front end (``dcm=True`` on ``qwen*`` and ``pixtral``).

A native-resolution recipe has no tiles: one view of the image at its own budgeted size, ``R x C`` cells
of ``u`` pixels (a cell is one LLM token: Qwen's merged 2x2 patches, ``u = 28``; Pixtral's ``m x m``
patches). ``dcm=True`` adds INF-LLaVA's global perspective of the *same* resized image and a DEM that
enhances the native feature map with it, leaving the model's token count and layout as they were::

    resized (R*u, C*u) --edge-padded to (gh*Rv*u, gw*Cv*u), Rv = ceil(R / gh), Cv = ceil(C / gw)
        --stride_crop(grid=(gh, gw))--> gh*gw global views of (Rv*u, Cv*u) pixels: each sees the whole image
        --the same packed tower pass as the native view--> (gh*gw, Rv*k * Cv*k, D)   (k: map tokens per cell side)
    native map (R*k, C*k, D) --edge-padded to (gh*Rv*k, gw*Cv*k)--> local_crop tiles of (Rv*k, Cv*k)
        --DEM (reduction="none"): local <-> global, windowed--> (gh*Rv*k, gw*Cv*k, D) --cropped--> (R*k, C*k, D)

The enhanced map takes the native map's place; the rest of the recipe (Qwen's tokens, Pixtral's merge,
projector and ``[IMG_BREAK]`` slots) runs on it unchanged. The grid ``dcm_grid`` (default ``(2, 2)``) is
the same for every image, so the DEM's windows scale with the image: its local windows are the
``(Rv*k, Cv*k)`` tiles of the native map, its global windows the strided sub-maps. Padding repeats the
last row / column (pixels and features alike), so a padded cell looks like its neighbour instead of
a black border; it is cropped away after the DEM. Cost: the global views hold ``gh*Rv*gw*Cv`` cells,
about the native view's ``R*C``, so the tower sees about twice the patches (its attention, per image,
is cheaper: each global view is ``gh*gw`` times smaller); see ``docs/recipes.md``.
"""

from __future__ import annotations

import torch

from .._validation import as_bool, as_grid
from ..ops.crop import local_crop, stride_crop

__all__ = ["NativeDualPerspective", "edge_padded"]


def edge_padded(x: torch.Tensor, size: tuple[int, int], dims: tuple[int, int] = (-2, -1)) -> torch.Tensor:
    """``x`` with its dimensions ``dims`` extended to ``size`` by repeating the last row / column (any dtype,
    uint8 included); ``x`` itself when it already has that size. ``(..., H, W)`` -> ``(..., size[0], size[1])``.

    Example::

        >>> edge_padded(torch.arange(4).view(2, 2), (3, 3))
        tensor([[0, 1, 1],
                [2, 3, 3],
                [2, 3, 3]])
    """
    for dim, n in zip(dims, size):
        have = x.shape[dim]
        if n != have:
            x = x.index_select(dim, torch.arange(n, device=x.device).clamp_(max=have - 1))
    return x


class NativeDualPerspective:
    """The ``dcm`` / ``dcm_grid`` options of a native-resolution front end and its three steps (mixin of
    :class:`~hrperc.recipes.qwen2_vl.NativeFrontEnd` and :class:`~hrperc.recipes.pixtral.PixtralFrontEnd`;
    see the module docs). The front end supplies ``held_dem`` / ``in_dem_dtype`` (``FrontEnd``)."""

    uses_dem: bool
    dcm_grid: tuple[int, int]

    def _init_dcm(self, dcm, dcm_grid) -> None:
        self.uses_dem, self.dcm_grid = as_bool(dcm, "dcm"), as_grid(dcm_grid)
        if self.dcm_grid == (1, 1) and self.uses_dem:
            raise ValueError(
                "dcm_grid=(1, 1) makes one global view equal to the native view, so the DEM would compare the "
                "map with itself. Pass dcm_grid=(2, 2) (the default) or another grid with more than one view."
            )

    def dcm_cells(self, cells: tuple[int, int]) -> tuple[int, int] | None:
        """``(Rv, Cv)``: cells per side of each global view of an ``(R, C)``-cell image; ``None`` without ``dcm``."""
        if not self.uses_dem:
            return None
        (gh, gw), (rows, cols) = self.dcm_grid, cells
        return -(-rows // gh), -(-cols // gw)

    def global_views(self, resized: torch.Tensor, view_cells: tuple[int, int], unit: int) -> torch.Tensor:
        """``(b, C, R*u, C*u)`` resized images -> ``(b, gh*gw, C, Rv*u, Cv*u)`` strided global views (dtype kept)."""
        (gh, gw), (rv, cv) = self.dcm_grid, view_cells
        padded = edge_padded(resized, (gh * rv * unit, gw * cv * unit))
        return stride_crop(padded, (gh, gw)).unflatten(0, (resized.shape[0], gh * gw))

    def enhance(self, fmap: torch.Tensor, global_feats: torch.Tensor, view_tokens: tuple[int, int]) -> torch.Tensor:
        """The DEM on one plan's maps: ``fmap`` ``(b, H, W, D)`` native features and ``global_feats``
        ``(b, gh*gw, Rt*Ct, D)`` of the global views (``view_tokens = (Rt, Ct)``) -> ``(b, H, W, D)`` enhanced,
        in the DEM's dtype."""
        (gh, gw), (rt, ct) = self.dcm_grid, view_tokens
        b, H, W, D = fmap.shape
        local = local_crop(edge_padded(fmap, (gh * rt, gw * ct), dims=(1, 2)), (gh, gw), layout="nhwc")
        dem = self.held_dem()  # type: ignore[attr-defined]
        loc = self.in_dem_dtype(local.reshape(b * gh * gw, rt * ct, D))  # type: ignore[attr-defined]
        glo = self.in_dem_dtype(global_feats.reshape(b * gh * gw, rt * ct, D))  # type: ignore[attr-defined]
        out = dem(loc, glo, (gh, gw), tile_size=(rt, ct))
        return out.view(b, gh * rt, gw * ct, D)[:, :H, :W]

    def dcm_repr(self) -> str:
        return f", dcm={self.uses_dem}" + (f", dcm_grid={self.dcm_grid}" if self.uses_dem else "")
