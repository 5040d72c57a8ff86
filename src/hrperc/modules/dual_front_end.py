"""INF-LLaVA's front end as a :class:`~hrperc.modules.frontend.FrontEnd`: dual-perspective crops, the DEM,
footprint skipping and the combine with the thumbnail.

:class:`DualFrontEnd` is what ``HighResEncoder(backbone, crop=DualPerspectiveCrop(...), dem=..., combine=...)``
and ``hrperc.create_encoder("inf_llava", ...)`` run::

    image --DualPerspectiveCrop--> N local + N strided sub-images (+ 1 thumbnail); only those the DEM can read
          --backbone (the runner: one batched pass for the whole batch)--> (ht*wt, D) tokens each
          --DEM, per grid (skipped sub-images read as zeros)--> (T_dem, D)
          --combine with the thumbnail's tokens--> (T, D)

Token accounting, with ``(ht, wt) = tile_size // patch`` and ``T_dem = dem.num_tokens(grid, tile)``
(``= ht*wt`` for the released bilinear reduction):

==============  ==================================  ===========================================
``combine``     with a DEM                          without a DEM (``dem=None``)
==============  ==================================  ===========================================
``"mean"``      ``ht*wt`` (needs ``T_dem = ht*wt``)  refused (nothing of the same shape to average)
``"concat"``    ``ht*wt + T_dem`` ([thumb, DEM])     ``ht*wt + 2*N*ht*wt`` ([thumb, local, global])
``"none"``      ``T_dem``                            ``2*N*ht*wt`` ([local map, global map])
==============  ==================================  ===========================================

(``thumbnail=False`` drops the ``ht*wt`` thumbnail term; "local map"/"global map" are the sub-image
tokens put back in image order by :func:`~hrperc.local_merge` / :func:`~hrperc.stride_merge`.)

Footprint-aware: the DEM's ``required_subimages`` says which sub-images its reduction can read at all;
the others are never encoded (:class:`DualPlan` lists the encoded ones) and their features are zeros,
which gives identical tokens (docs/released.md: the released 3x3 reduction reads only the centre
strided sub-image, so 11 ViT passes replace 19). ``encode_all=True`` encodes everything.

Example::

    >>> import torch
    >>> from hrperc.modules.dual_crop import DualPerspectiveCrop
    >>> fe = DualFrontEnd(DualPerspectiveCrop(grid=(3, 3), tile_size=28), (7, 7), combine="concat")
    >>> plan = fe.plan((90, 80))                       # no DEM: every sub-image, [thumb, local, global]
    >>> plan.views, plan.num_tokens, [s.source for s in plan.layout]
    (19, 304, ['thumbnail', 'local', 'global'])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._errors import public
from .._validation import as_bool
from ..ops.crop import local_merge, stride_merge
from .dual_crop import DualCrops, DualPerspectiveCrop
from .frontend import FrontEnd, TokenSegment, ViewPlan, check_dem_width

__all__ = ["DualFrontEnd", "DualPlan", "SubimageFeatures", "COMBINES"]

#: How the high-resolution tokens meet the thumbnail's (see the module table).
COMBINES = ("mean", "concat", "none")


@dataclass(frozen=True)
class DualPlan(ViewPlan):
    """The plan of one image: ``local`` / ``strided``, the sub-images ``k = i*gw + j`` encoded from each
    stack (the others cannot reach the tokens and read as zeros); ``thumbnail``: whether the thumbnail is
    encoded. ``views = len(local) + len(strided) + thumbnail``, in that order."""

    local: tuple[int, ...]
    strided: tuple[int, ...]
    thumbnail: bool

    @property
    def skipped(self) -> int:
        return 2 * self.geometry.num_tiles - len(self.local) - len(self.strided)


@dataclass
class SubimageFeatures:
    """ViT tokens of all sub-images of a batch (see :meth:`DualFrontEnd.subimage_features`)."""

    local: torch.Tensor
    strided: torch.Tensor
    thumbnail: torch.Tensor | None
    crops: DualCrops
    encoded: int
    skipped: int


class DualFrontEnd(FrontEnd[DualPlan]):
    """INF-LLaVA's front end (see the module docs): ``crop`` (a :class:`~hrperc.DualPerspectiveCrop`),
    ``combine`` (``"mean"``, ``"concat"`` or ``"none"``; with ``"none"`` the thumbnail is not encoded),
    ``encode_all`` (encode the sub-images the DEM never reads too). The DEM is ``self.dem`` (``None``: no
    enhancement, the sub-image maps are returned), set by :class:`~hrperc.HighResEncoder`."""

    tile_size: tuple[int, int]  # always set: the backbone's tile

    @public(name="DualFrontEnd")
    def __init__(
        self,
        crop: DualPerspectiveCrop,
        patch_size,
        *,
        combine: str = "mean",
        encode_all: bool = False,
    ) -> None:
        if not isinstance(crop, DualPerspectiveCrop):
            raise TypeError(f"crop is a {type(crop).__name__}; pass a DualPerspectiveCrop.")
        super().__init__(crop.tile_size, patch_size)
        if combine not in COMBINES:
            raise ValueError(f"combine={combine!r} is not one of {COMBINES}; pass one of them.")
        if combine == "mean" and not crop.thumbnail:
            raise ValueError(
                "combine='mean' averages with the thumbnail's tokens, but the crop has thumbnail=False. "
                "Build the crop with thumbnail=True, or pass combine='none'."
            )
        self.crop, self.combine, self.encode_all = crop, combine, as_bool(encode_all, "encode_all")

    @property
    def thumbnail(self) -> bool:
        """Whether the crop makes a thumbnail (the whole image resized to one tile)."""
        return self.crop.thumbnail

    @property
    def encodes_thumbnail(self) -> bool:
        """Whether the thumbnail goes through the ViT: ``thumbnail=True`` and a ``combine`` that uses it."""
        return self.thumbnail and self.combine != "none"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, combine={self.combine!r}, encode_all={self.encode_all}"

    # --- the DEM -------------------------------------------------------------------------------------
    def default_dem(self, width: int):
        """A fresh DEM of the released configuration (bilinear reduction back to one tile's token grid)."""
        from .dem import DualPerspectiveEnhancement, default_heads

        return DualPerspectiveEnhancement(width, heads=default_heads(width))

    def check_dem(self, dem, width: int) -> None:
        """Refuse what cannot run: no DEM with ``combine="mean"``, a DEM of another width, and, for a fixed
        grid, a DEM whose token count cannot be averaged with the thumbnail's (an ``"auto"`` grid is
        checked per grid, when a size is planned)."""
        if dem is None:
            if self.combine == "mean":
                raise ValueError(
                    "combine='mean' averages the DEM's tokens with the thumbnail's, but dem=None. Pass "
                    "dem='default' (or a DualPerspectiveEnhancement), or combine='concat'/'none'."
                )
            return
        check_dem_width(dem, width)
        if isinstance(self.crop.grid, tuple):
            self._check_mean(self.crop.grid, dem)

    def _check_mean(self, grid, dem=None) -> None:
        dem = self.held_dem() if dem is None else dem
        (ht, wt), got = self.tile_tokens, int(dem.num_tokens(grid, self.tile_tokens))
        if self.combine == "mean" and got != ht * wt:
            raise ValueError(
                f"combine='mean' needs the DEM to return {ht * wt} tokens (one per thumbnail "
                f"token) but at grid {tuple(grid)} it returns {got}. Use a DEM reduction back to ({ht}, {wt}) "
                f"or combine='concat'."
            )

    @public(name="DualFrontEnd.required_subimages")
    def required_subimages(self, grid, encode_all: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(local_needed, global_needed)``, two ``(N,)`` bool masks of the sub-images that are encoded."""
        n = grid[0] * grid[1]
        everything = self.encode_all if encode_all is None else as_bool(encode_all, "encode_all")
        if self.dem is None or everything:
            return torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)
        dem: Any = self.held_dem()  # a DEM module, or your own with num_tokens / required_subimages
        local, glob = dem.required_subimages(tuple(grid), self.tile_tokens)
        return torch.as_tensor(local, dtype=torch.bool).cpu(), torch.as_tensor(glob, dtype=torch.bool).cpu()

    # --- the contract ----------------------------------------------------------------------------------
    def _layout(self, grid) -> tuple[TokenSegment, ...]:
        (ht, wt), (gh, gw) = self.tile_tokens, grid
        per, segs = ht * wt, []
        with_thumb = self.combine == "concat" and self.thumbnail
        dem: Any = self.dem
        if dem is not None:
            self._check_mean(grid)
            t = int(dem.num_tokens(grid, self.tile_tokens))
            shape = (ht, wt) if t == per else (gh * ht, gw * wt) if t == gh * gw * per else None
            if self.combine == "mean":
                segs.append(("mean(thumbnail, dem)", t, shape))
            else:
                segs += [("thumbnail", per, (ht, wt))] * with_thumb + [("dem", t, shape)]
        else:
            segs += [("thumbnail", per, (ht, wt))] * with_thumb
            segs += [("local", gh * gw * per, (gh * ht, gw * wt)), ("global", gh * gw * per, (gh * ht, gw * wt))]
        out, start = [], 0
        for name, n, shape in segs:
            out.append(TokenSegment(name, start, start + n, shape))
            start += n
        return tuple(out)

    def plan(self, image_size) -> DualPlan:
        geo = self.crop.plan(image_size)
        local, strided = (tuple(m.nonzero().flatten().tolist()) for m in self.required_subimages(geo.grid))
        thumb = self.encodes_thumbnail
        views = len(local) + len(strided) + int(thumb)
        return DualPlan(image_size, views, geo, self._layout(geo.grid), local, strided, thumb)

    def views(self, pixels: torch.Tensor, plan: DualPlan) -> tuple[torch.Tensor, ...]:
        """``(b, C, H, W)`` -> ``(local (b, |local|, C, h, w), strided (b, |strided|, C, h, w)[, thumbnail
        (b, 1, C, h, w)])``, float32 ``[0, 1]`` (uint8 is resized exactly, without a full-size float copy)."""
        crops = self.crop(pixels, thumbnail=plan.thumbnail, scale_uint8=True)  # no thumbnail resize when not encoded
        b, n = pixels.shape[0], plan.geometry.num_tiles

        def pick(stack, idx):
            stack = stack.unflatten(0, (b, n))
            return stack if len(idx) == n else stack[:, torch.tensor(idx, device=stack.device, dtype=torch.long)]

        parts = (pick(crops.local, plan.local), pick(crops.strided, plan.strided))
        return parts + (crops.thumbnail[:, None],) if plan.thumbnail else parts

    def assemble(self, feats, plan: DualPlan, *, project=None) -> torch.Tensor:
        """The parts' ``(b, V_p, ht*wt, D)`` features -> ``(b, T, D)``: DEM (or the two maps), then ``combine``."""
        (ht, wt), grid, n = self.tile_tokens, plan.grid, plan.geometry.num_tiles
        loc, glo = _scatter(feats[0], plan.local, n), _scatter(feats[1], plan.strided, n)
        thumb = feats[2][:, 0] if plan.thumbnail else None
        if self.dem is not None:
            self._check_mean(grid)
            hi = self.dem(self.in_dem_dtype(loc), self.in_dem_dtype(glo), grid, tile_size=(ht, wt))
        else:
            D = loc.shape[-1]
            loc_map = local_merge(loc.reshape(-1, ht, wt, D), grid, layout="nhwc")
            glo_map = stride_merge(glo.reshape(-1, ht, wt, D), grid, layout="nhwc")
            hi = torch.cat([loc_map.flatten(1, 2), glo_map.flatten(1, 2)], dim=1)
        tokens = self.combine_tokens(hi, thumb)
        return tokens if project is None else project(tokens)

    def extras(self, feats, plan: DualPlan) -> dict[str, torch.Tensor]:
        """``thumbnail_tokens``: ``(b, ht*wt, D)``, the thumbnail's ViT tokens, when it was encoded."""
        return {"thumbnail_tokens": feats[2][:, 0]} if plan.thumbnail else {}

    @public(name="DualFrontEnd.combine_tokens")
    def combine_tokens(self, hi: torch.Tensor, thumb: torch.Tensor | None) -> torch.Tensor:
        """``hi`` ``(b, T_hi, D)`` and ``thumb`` ``(b, ht*wt, D)`` -> ``(b, T, D)`` by ``combine``."""
        if self.combine == "mean":
            if thumb is None:
                raise ValueError(
                    "combine='mean' averages with the thumbnail's tokens, "
                    "but thumb=None. Pass the thumbnail's tokens (subimage_features' thumbnail)."
                )
            return (hi + thumb.to(hi.dtype)) / 2
        if self.combine == "concat" and thumb is not None:
            return torch.cat([thumb.to(hi.dtype), hi], dim=1)
        return hi

    # --- crop and encode only ------------------------------------------------------------------------------
    @public(name="DualFrontEnd.subimage_features")
    def subimage_features(self, pixels, encode, encode_all=None, thumbnail=None) -> SubimageFeatures:
        """The ViT tokens of every sub-image, before any enhancement (``encode``: ``(S, 3, h, w)`` pixels ->
        ``(S, ht*wt, D)``, the runner's batched backbone pass).

        ``local``/``strided``: ``(sum_b N_b, ht*wt, D)`` in ``local_crop``/``stride_crop`` order (image ``b``
        at ``crops.offsets[b]``), zeros for sub-images that were skipped; ``thumbnail``: ``(B, ht*wt, D)``,
        or ``None`` when the crop has ``thumbnail=False`` or the ``thumbnail`` argument is False.
        ``encode_all`` overrides the front end's setting.
        """
        everything = self.encode_all if encode_all is None else as_bool(encode_all, "encode_all")
        with_thumb = self.thumbnail if thumbnail is None else as_bool(thumbnail, "thumbnail") and self.thumbnail
        crops = self.crop(pixels, thumbnail=with_thumb, scale_uint8=True)  # no thumbnail resize when not encoded
        geos, offsets = crops.geometries, crops.offsets
        n_total = crops.local.shape[0]
        # Which sub-images are read: index lists over the whole batch's stacks (one entry per image).
        needs = {g: self.required_subimages(g, everything) for g in {geo.grid for geo in geos}}
        local_idx = torch.cat([needs[geo.grid][0].nonzero().flatten() + off for geo, off in zip(geos, offsets)])
        global_idx = torch.cat([needs[geo.grid][1].nonzero().flatten() + off for geo, off in zip(geos, offsets)])
        all_local, all_global = len(local_idx) == n_total, len(global_idx) == n_total
        parts = [crops.local if all_local else crops.local[local_idx.to(crops.local.device)]]
        parts.append(crops.strided if all_global else crops.strided[global_idx.to(crops.strided.device)])
        if with_thumb:
            parts.append(crops.thumbnail)
        stack = torch.cat(parts)
        feats = encode(stack)  # one batched pass (chunks of max_batch) for the whole batch
        n_local, n_global = len(local_idx), len(global_idx)

        def scatter(rows, idx, complete):  # encoded features back at their stack positions; skipped ones are zeros
            full = rows if complete else rows.new_zeros(n_total, *rows.shape[1:])
            return full if complete else full.index_copy(0, idx.to(rows.device), rows)

        return SubimageFeatures(
            local=scatter(feats[:n_local], local_idx, all_local),
            strided=scatter(feats[n_local : n_local + n_global], global_idx, all_global),
            thumbnail=feats[n_local + n_global :] if with_thumb else None,
            crops=crops,
            encoded=int(stack.shape[0]),
            skipped=2 * n_total - n_local - n_global,
        )


def _scatter(part: torch.Tensor, idx: tuple[int, ...], n: int) -> torch.Tensor:
    """``(b, |idx|, T, D)`` features of sub-images ``idx`` -> the ``(b*n, T, D)`` stack; skipped ones are zeros."""
    if len(idx) == n:
        return part.flatten(0, 1)
    full = part.new_zeros(part.shape[0], n, *part.shape[2:])
    full[:, torch.tensor(idx, device=part.device, dtype=torch.long)] = part
    return full.flatten(0, 1)
