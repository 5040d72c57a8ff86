"""Dual-perspective Enhancement (INF-LLaVA DEM, Sec. 4.3.2-4.3.4), as in the paper and as released.

Inputs are the two stacks a ViT returns for one grid: local sub-features in ``local_crop`` order and
global (strided) sub-features in ``stride_crop`` order, both ``(B*N, ht*wt, D)``. Conceptually::

    F_loc = local_merge(local_feats)      F_glo = stride_merge(global_feats)       # (B, Ht, Wt, D)
    E_glo = Attn(q=F_glo, kv=F_loc)  per window of kind W_g   ("global perspective")
    E_loc = Attn(q=F_loc, kv=F_glo)  per window of kind W_l   ("local perspective")
    out   = reduce(fuse(E_loc, E_glo))                                              # (B, T_out, D)

``pairing="released"``: W_g = contiguous, W_l = strided (the authors' code, default);
``pairing="paper"``: W_g = strided, W_l = contiguous (eq. 18-25). Released attention:
``LN(out_proj(attn) + query)``, one module shared by both directions. See ``docs/dem.md``; the
released model's facts are in ``docs/released.md`` and its weights load with
:func:`hrperc.pretrained.inf_llava.load_dem`.

**Skipping unread work** (``skip_unread=True``, default). The reduction reads only its footprint
(:func:`hrperc.ops.reduce.reduction_footprint`); with a per-token fusion only the enhanced tokens at
those positions matter, so only their queries, attention rows, output projections, LayerNorms and
fusions are computed, and only the key/value windows those queries fall in are projected. For the
released bilinear reduction by 3 that is 1/9 of the queries, and in the strided direction a single
global window. When the footprint is every token (bilinear by 2, ``reduction="none"``) every token is
computed directly. Average pooling commutes with affine maps, so with ``avg``/``area`` reduction, an
affine fusion and ``residual_norm=False`` it is applied before the output projections and the fusion.
The result equals the full computation (``skip_unread=False``) to float rounding. The gather indices
of that path come from :mod:`hrperc.ops.dem_plan`.

Example::

    >>> import torch, hrperc
    >>> dem = hrperc.DualPerspectiveEnhancement(dim=64, heads=2)
    >>> loc, glo = torch.randn(2 * 9, 36, 64), torch.randn(2 * 9, 36, 64)   # B=2, grid 3x3, 6x6 tokens
    >>> dem(loc, glo, grid=(3, 3)).shape                                     # (B, ht*wt, D)
    torch.Size([2, 36, 64])
    >>> dem.required_subimages((3, 3), (6, 6))[1].tolist()                   # strided sub-images read
    [False, False, False, False, True, False, False, False, False]
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import public
from .._validation import as_grid, as_int, as_pair
from ..attention.backend import AttentionBackend, check_output
from ..attention.dispatch import forced_backend, resolve_backend
from ..attention.module import WindowCrossAttention
from ..ops.crop import merge
from ..ops.dem_plan import Plan, plan_for, plan_indices, required_subimages
from ..ops.geometry import WindowKind, check_window_stacks
from ..ops.reduce import REDUCTIONS, ReductionMode, apply_reduction_plan, reduce_tokens
from .fusion import FUSIONS, Fusion, FusionMode

__all__ = ["DualPerspectiveEnhancement", "PAIRINGS", "DIRECTIONS", "default_heads"]

PAIRINGS = ("released", "paper")
DIRECTIONS = ("both", "global", "local", "none")
Pairing = Literal["released", "paper"]
Directions = Literal["both", "global", "local", "none"]

# Which window kind each direction attends in: (global-as-query, local-as-query).
_WINDOWS: dict[str, tuple[WindowKind, WindowKind]] = {
    "released": ("contiguous", "strided"),
    "paper": ("strided", "contiguous"),
}


def default_heads(dim: int) -> int:
    """The DEM's head count for width ``dim``: 8 (as released) when it divides ``dim``, else 4, 2, 1."""
    for heads in (8, 4, 2, 1):
        if dim % heads == 0:
            return heads
    return 1  # pragma: no cover


# ----------------------------------------------------------------------------------------------------
# The module


class DualPerspectiveEnhancement(nn.Module):
    """INF-LLaVA's DEM: two windowed cross-attentions between the local and global maps, fusion, reduction.

    ``forward(local_feats, global_feats, grid, tile_size=None, backend="auto")``: ``(B*N, ht*wt, D)``
    stacks in ``local_crop`` / ``stride_crop`` order -> ``(B, T_out, D)`` row-major tokens,
    ``T_out = oh*ow`` (``output_size``, default ``(ht, wt)``; ``Ht*Wt`` for ``reduction="none"``).

    Options: ``pairing`` ``"released"|"paper"``; ``shared_attention`` (released: one module,
    ``attention.*``; else ``attention_global.*`` / ``attention_local.*``); ``residual_norm``
    (``LN(out_proj(attn) + query)``); ``directions`` ``"both"|"global"|"local"|"none"`` (Table 4; a
    direction that is off passes its query map through un-enhanced, and ``"none"`` with
    ``fusion="add"`` is Table 6's plain-addition baseline); ``fusion`` (see :mod:`hrperc.modules.fusion`);
    ``reduction`` ``"bilinear"|"avg"|"area"|"none"``; ``skip_unread`` (compute only tokens the
    reduction reads; ``False`` computes every token). The defaults are the released configuration.

    Which path runs with ``skip_unread=True``: the footprint path (only the read tokens) for a
    per-token fusion whose reduction reads a strict subset of the tokens (bilinear at a factor >= 3);
    the every-token path when the reduction reads every token anyway (e.g. bilinear by 2,
    ``reduction="none"``); and, for ``avg``/``area`` pooling with an affine fusion (``linear_concat``,
    ``add``, ``weighted_add``) and no LayerNorm after the attention (``residual_norm=False``), pooling
    *before* the output projections and the fusion (they then run on ``oh*ow`` tokens, not ``Ht*Wt``).
    All are equal to ``skip_unread=False`` to float rounding.

    Attention backend (``forward(backend=...)``, :func:`hrperc.attention_backend`,
    ``$HRPERC_ATTN_BACKEND``, in that precedence; unknown names raise): the every-token and pooled
    paths run :func:`hrperc.window_attention` with it. The footprint path attends a subset of each
    window's queries, so it needs the backend's query-subset form
    (:class:`~hrperc.attention.QuerySubsetFn`): ``"sdpa"`` (also what ``"auto"`` uses there, on any
    device) and ``"reference"`` (plain math) have one. A forced backend without one -- ``"triton"``,
    whose kernel takes whole windows, or a registered backend given no ``query_subset`` -- makes the
    module compute every token through that backend instead: forcing a backend always runs it.

    Example::

        >>> dem = DualPerspectiveEnhancement(dim=32, heads=4, pairing="paper", reduction="avg")
        >>> dem(torch.randn(4, 16, 32), torch.randn(4, 16, 32), grid=(2, 2)).shape
        torch.Size([1, 16, 32])
    """

    @public(name="DualPerspectiveEnhancement")
    def __init__(
        self,
        dim: int = 1024,
        heads: int = 8,
        *,
        pairing: Pairing = "released",
        shared_attention: bool = True,
        residual_norm: bool = True,
        directions: Directions = "both",
        fusion: FusionMode = "released",
        reduction: ReductionMode = "bilinear",
        output_size=None,
        skip_unread: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value, choices in (
            ("pairing", pairing, PAIRINGS),
            ("directions", directions, DIRECTIONS),
            ("fusion", fusion, FUSIONS),
            ("reduction", reduction, REDUCTIONS),
        ):
            if value not in choices:
                raise ValueError(f"{name}={value!r} is not a known {name}; pass one of {choices}.")
        # Not an int: TypeError, an int below 1: ValueError (as_int), as for every count in hrperc.
        dim = as_int(dim, "dim", example="dim=1024 (CLIP ViT-L's width)")
        heads = as_int(heads, "heads", example="heads=8 (as released)")
        if dim % heads:
            raise ValueError(
                f"dim={dim!r}, heads={heads!r}; heads must be a positive int dividing dim "
                f"(head_dim = dim/heads), e.g. dim=1024, heads=8."
            )
        if output_size is not None:
            if reduction == "none":
                raise ValueError(f"output_size={output_size!r} with reduction='none'; drop one of them.")
            output_size = as_pair(output_size, "output_size")
        self.dim, self.heads, self.pairing, self.directions = dim, heads, pairing, directions
        self.shared_attention, self.residual_norm = shared_attention, residual_norm
        self.reduction, self.output_size, self.skip_unread = reduction, output_size, skip_unread
        kw = dict(residual_norm=residual_norm, device=device, dtype=dtype)
        if directions != "none":
            if shared_attention:
                self.attention = WindowCrossAttention(dim, heads, **kw)
            else:
                if directions in ("both", "global"):
                    self.attention_global = WindowCrossAttention(dim, heads, **kw)
                if directions in ("both", "local"):
                    self.attention_local = WindowCrossAttention(dim, heads, **kw)
        self.fusion = Fusion(dim, fusion, device=device, dtype=dtype)

    # -- configuration helpers ------------------------------------------------------------------

    @property
    def windows(self) -> tuple[WindowKind, WindowKind]:
        """Window kinds of (global-as-query, local-as-query) under the configured pairing."""
        return _WINDOWS[self.pairing]

    def _attn(self, direction: str) -> WindowCrossAttention:
        return self.attention if self.shared_attention else getattr(self, f"attention_{direction}")

    def _out_hw(self, grid, tile) -> tuple[int, int] | None:
        if self.reduction == "none":
            return None
        return self.output_size or tile

    def _can_skip(self) -> bool:
        return self.fusion.per_token

    @public(name="DualPerspectiveEnhancement.num_tokens")
    def num_tokens(self, grid, tile_size) -> int:
        """Number of output tokens ``T_out`` for this grid and ViT token grid ``(ht, wt)``.

        Example::

            >>> DualPerspectiveEnhancement(32, 4).num_tokens((3, 3), (24, 24))
            576
        """
        (gh, gw), (th, tw) = as_grid(grid), as_pair(tile_size, "tile_size")
        oh, ow = self._out_hw((gh, gw), (th, tw)) or (gh * th, gw * tw)
        return oh * ow

    def _plan(self, grid, tile) -> Plan:
        return plan_for(grid, tile, self._out_hw(grid, tile), self.reduction, self.windows, self.directions)

    @public(name="DualPerspectiveEnhancement.required_subimages")
    def required_subimages(self, grid, tile_size) -> tuple[torch.Tensor, torch.Tensor]:
        """Which local and which strided sub-images can reach the output: two ``(N,)`` bool tensors.

        Derived from the reduction's footprint, the pairing and the directions. Sub-images marked
        False never influence the output, so an encoder may skip their ViT passes (feed anything).
        Released 3x3: all 9 local, strided ``k = 4`` only.

        Example::

            >>> dem = DualPerspectiveEnhancement(32, 4)
            >>> [m.nonzero().flatten().tolist() for m in dem.required_subimages((4, 4), (8, 8))]
            [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [5, 6, 9, 10]]
        """
        (gh, gw), (th, tw) = as_grid(grid), as_pair(tile_size, "tile_size")
        n = gh * gw
        if not self._can_skip():
            return torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)
        return required_subimages(self._plan((gh, gw), (th, tw)))

    # -- forward ----------------------------------------------------------------------------------

    def _check(self, local_feats, global_feats, grid, tile_size):
        grid, tile = check_window_stacks(
            grid,
            tile_size,
            layout="(B*N, ht*wt, D) ViT tokens (CLS dropped)",
            local_feats=local_feats,
            global_feats=global_feats,
        )
        d = local_feats.shape[-1]
        if d != self.dim:
            raise ValueError(
                f"features have D={d} (shape {tuple(local_feats.shape)}) but the module was built with "
                f"dim={self.dim}; D must equal dim. Pass the features of a ViT of width {self.dim}, or build "
                f"DualPerspectiveEnhancement(dim={d}, heads=...) for these."
            )
        self._check_dtypes(local_feats, global_feats)
        return grid, tile

    def _check_dtypes(self, local_feats, global_feats) -> None:
        """Features must be floating point, of one dtype, and (outside autocast) of the parameters' dtype."""
        for name, t in (("local_feats", local_feats), ("global_feats", global_feats)):
            if not t.is_floating_point():
                raise TypeError(
                    f"{name} has dtype {t.dtype}; the DEM needs floating-point features (ViT tokens). "
                    f"Convert them to the module's dtype, e.g. {name}.to({self._param_dtype() or torch.float32})."
                )
        if local_feats.dtype != global_feats.dtype:
            raise TypeError(
                f"local_feats has dtype {local_feats.dtype} but global_feats has dtype {global_feats.dtype}; "
                f"both must have one dtype. Convert one of them, e.g. global_feats.to(local_feats.dtype)."
            )
        if torch.is_autocast_enabled(local_feats.device.type):
            return  # autocast casts the features and weights of each op itself
        want = self._param_dtype()
        if want is not None and local_feats.dtype != want:
            raise TypeError(
                f"features have dtype {local_feats.dtype} but the module's parameters are {want}; they must "
                f"match (no silent cast). Convert the features (local_feats.to({want}), global_feats.to({want})) or "
                f"the module (dem.to({local_feats.dtype})), or use torch.autocast."
            )

    def _param_dtype(self) -> torch.dtype | None:
        """The one floating dtype of the parameters, or ``None`` (no parameters, or several dtypes)."""
        dtypes = {p.dtype for p in self.parameters() if p.is_floating_point()}
        return dtypes.pop() if len(dtypes) == 1 else None

    @public(name="DualPerspectiveEnhancement")
    def forward(self, local_feats, global_feats, grid, tile_size=None, backend: str = "auto") -> torch.Tensor:
        """Enhance, fuse and reduce one grid's ViT features.

        Args:
            local_feats: ``(B*N, ht*wt, D)``, the ViT tokens of ``local_crop`` sub-images (CLS dropped);
                sub-image ``k = i*gw + j`` of image ``b`` at index ``b*N + k``.
            global_feats: ``(B*N, ht*wt, D)``, the same for ``stride_crop`` sub-images.
            grid: ``(gh, gw)`` the sub-images were cut with (an int means square), ``N = gh*gw``.
            tile_size: ``(ht, wt)``; inferred when ``ht*wt`` is a perfect square.
            backend: attention backend, ``"auto"`` or a registered name (``"reference"``, ``"sdpa"``,
                ``"triton"``, ...). ``"auto"`` honours :func:`hrperc.attention_backend` and
                ``$HRPERC_ATTN_BACKEND``; an unknown name raises ``ValueError``. See the class docstring
                for how a forced backend meets ``skip_unread``.

        Returns:
            ``(B, T_out, D)`` row-major tokens in the features' dtype: ``T_out = oh*ow`` with
            ``(oh, ow) = output_size`` (default ``(ht, wt)``), or ``gh*ht * gw*wt`` for ``reduction="none"``.

        Raises:
            TypeError: features that are not floating point, of two dtypes, or (outside ``torch.autocast``)
                of another dtype than the parameters: nothing is cast silently (``dem.to(dtype)`` or
                ``feats.to(dtype)``; :class:`hrperc.HighResEncoder` casts the ViT features to the DEM's dtype).
        """
        grid, tile = self._check(local_feats, global_feats, grid, tile_size)
        forced_backend(backend)  # an unknown name raises here, whichever path runs
        path = self._path(grid, tile)
        if path == "pooled":
            return self._forward_pooled(local_feats, global_feats, grid, tile, backend)
        if path == "read":
            subset = self._subset_backend(backend, local_feats, grid, tile)
            if subset is not False:
                return self._forward_read(local_feats, global_feats, grid, tile, subset)
        return self._forward_full(local_feats, global_feats, grid, tile, backend)

    def _path(self, grid, tile) -> str:
        """``"read"`` (footprint tokens only), ``"pooled"`` (pool before the affine maps) or ``"full"``."""
        if not self.skip_unread or not self._can_skip():
            return "full"
        if self._can_pool():
            return "pooled"
        return "full" if self._plan(grid, tile).reads_all else "read"

    def _can_pool(self) -> bool:
        """Average pooling commutes with what follows the attention: no LayerNorm, an affine fusion."""
        no_norm = self.directions == "none" or not self.residual_norm
        return self.reduction in ("avg", "area") and no_norm and self.fusion.affine

    def _subset_backend(self, backend, feats, grid, tile) -> AttentionBackend | None | bool:
        """The backend whose :class:`~hrperc.attention.QuerySubsetFn` the skipping path attends with, None when no
        attention runs (``directions="none"``), or False when the forced backend takes whole windows only."""
        if self.directions == "none":
            return None
        query = "global" if self.directions in ("both", "global") else "local"
        heads = self._attn(query).heads
        probe = feats.unflatten(-1, (heads, self.dim // heads))  # a view: dtype, device, head_dim for supports()
        w_g, w_l = self.windows
        window, q_order, kv_order = (
            (w_g, "strided", "contiguous") if query == "global" else (w_l, "contiguous", "strided")
        )
        chosen = resolve_backend(
            backend,
            probe,
            probe,
            probe,
            query_subset=True,
            grid=grid,
            tile_size=tile,
            window=window,
            q_order=q_order,
            kv_order=kv_order,
            out_order="map",
            scale=float(probe.shape[-1] ** -0.5),
        )
        return False if chosen.query_subset is None else chosen

    def _forward_full(self, loc, glo, grid, tile, backend):
        """Every token: attention via :func:`hrperc.window_attention` (any backend), maps, fusion, reduction."""
        (gh, gw), (th, tw) = grid, tile
        e_loc, e_glo = self._enhanced_maps(loc, glo, grid, tile, backend, project=True)
        hw = (gh * th, gw * tw)
        fused = self.fusion(e_loc, e_glo, hw=hw)
        return reduce_tokens(fused.reshape(fused.shape[0], hw[0], hw[1], -1), self._out_hw(grid, tile), self.reduction)

    def _enhanced_maps(self, loc, glo, grid, tile, backend, project: bool):
        """``(E_loc, E_glo)`` as ``(B, Ht*Wt, D)`` maps; ``project=False`` stops before the output projection."""
        w_g, w_l = self.windows
        kw = dict(out_order="map", tile_size=tile, backend=backend)
        maps = {}
        runs: tuple[tuple[str, WindowKind, torch.Tensor, torch.Tensor, WindowKind, WindowKind], ...] = (
            ("global", w_g, glo, loc, "strided", "contiguous"),
            ("local", w_l, loc, glo, "contiguous", "strided"),
        )
        for query, window, q_stack, kv_stack, q_order, kv_order in runs:
            if self.directions in ("both", query):
                attn = self._attn(query)
                call = attn if project else attn.attend
                maps[query] = call(q_stack, kv_stack, grid, window=window, q_order=q_order, kv_order=kv_order, **kw)
            else:  # direction off: the query map passes through un-enhanced
                maps[query] = merge(q_stack, grid, q_order, layout="nlc", tile_size=tile)
        return maps["local"], maps["global"]

    def _forward_pooled(self, loc, glo, grid, tile, backend):
        """Average pooling first, then the output projections and the fusion; equal to ``_forward_full``.

        Each pooled token is a convex combination of map tokens (weights summing to 1), so it commutes
        with every affine per-token map: ``pool(fuse(out(A_l), out(A_g))) = fuse(out(pool A_l), out(pool A_g))``
        when there is no LayerNorm after the attention and the fusion is affine (``linear_concat``,
        ``add``, ``weighted_add``). The output projections and fusion then run on ``oh*ow`` tokens
        instead of ``Ht*Wt``. Pooling is in float32 (float64 for float64), as in :func:`reduce_tokens`.
        """
        (gh, gw), (th, tw) = grid, tile
        out_hw = self._out_hw(grid, tile)
        a_loc, a_glo = self._enhanced_maps(loc, glo, grid, tile, backend, project=False)
        pooled = {}
        for query, a in (("local", a_loc), ("global", a_glo)):
            p = reduce_tokens(a.view(a.shape[0], gh * th, gw * tw, -1), out_hw, self.reduction)
            if self.directions in ("both", query):
                lo = self._attn(query).linears[3]
                p = F.linear(p, lo.weight, lo.bias)
            pooled[query] = p
        return self.fusion(pooled["local"], pooled["global"])

    def _forward_read(self, loc, glo, grid, tile, subset):
        """Only the tokens the reduction reads (see the module docstring); equal to ``_forward_full``.

        ``subset``: the backend whose :class:`~hrperc.attention.QuerySubsetFn` attends the gathered queries (its
        result checked as :func:`hrperc.window_attention` checks a backend's).
        """
        plan = self._plan(grid, tile)
        idx = plan_indices(plan, loc.device)
        n = grid[0] * grid[1]
        b = loc.shape[0] // n
        stacks = {"local": loc.reshape(b, -1, self.dim), "global": glo.reshape(b, -1, self.dim)}
        enhanced = {}
        for query, name, dp in (("global", "glob", plan.glob), ("local", "loc", plan.loc)):
            read = idx[f"read_{query}"]
            if dp is None:
                enhanced[query] = stacks[query].index_select(1, read)
                continue
            kv_side = "local" if query == "global" else "global"
            enhanced[query] = self._attend_read(
                self._attn(query), stacks[query], stacks[kv_side], dp, idx, name, read, b, n, tile, subset
            )
        fused = self.fusion(enhanced["local"], enhanced["global"])
        return apply_reduction_plan(fused, plan.reduction)

    def _attend_read(self, attn, q_stack, kv_stack, dp, idx, name, read, b, n, tile, subset):
        d, h = self.dim, attn.heads
        hd = d // h
        lq, lk, lv, lo = attn.linears
        nw = len(dp.rows.windows) * len(dp.cols.windows)
        m = dp.rows.m * dp.cols.m
        t = tile[0] * tile[1]
        q_in = q_stack.index_select(1, idx[f"{name}_q"])  # (B, nw*m, D), window-major
        q = F.linear(q_in, lq.weight, lq.bias).view(b * nw, m, h, hd).transpose(1, 2)
        kv_index = idx[f"{name}_kv"]
        if dp.kv_subimages is None:
            kv_in = kv_stack.index_select(1, kv_index)
        elif len(dp.kv_subimages) == n and dp.kv_subimages == tuple(range(n)):
            kv_in = kv_stack  # every window, already in window order: no copy
        else:
            kv_in = kv_stack.view(b, n, t, d).index_select(1, kv_index)
        # Two matmuls on the same tokens (no per-call concatenation of the k and v weights).
        k = F.linear(kv_in, lk.weight, lk.bias).view(b * nw, t, h, hd).transpose(1, 2)
        v = F.linear(kv_in, lv.weight, lv.bias).view(b * nw, t, h, hd).transpose(1, 2)
        o = subset.query_subset(q, k, v, scale=hd**-0.5)  # (B*nw, h, m, hd)
        o = check_output(
            subset,
            o,
            q.shape,
            q,
            form="query_subset",
            layout="(G, heads, M, head_dim)",
        )
        o = o.transpose(1, 2).reshape(b, nw * m, d).index_select(1, idx[f"{name}_select"])  # read order
        o = F.linear(o, lo.weight, lo.bias)
        if attn.ln is None:
            return o
        return attn.ln(o + q_stack.index_select(1, read))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, pairing={self.pairing!r}, directions={self.directions!r}, "
            f"shared_attention={self.shared_attention}, residual_norm={self.residual_norm}, "
            f"fusion={self.fusion.mode!r}, reduction={self.reduction!r}, output_size={self.output_size}, "
            f"skip_unread={self.skip_unread}"
        )
