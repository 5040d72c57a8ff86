"""The windowed cross-attention module of the DEM: :class:`WindowCrossAttention`.

Example::

    >>> import torch, hrperc
    >>> loc, glo = torch.randn(2 * 4, 16, 32), torch.randn(2 * 4, 16, 32)   # B=2, grid 2x2, 4x4 tiles
    >>> attn = hrperc.WindowCrossAttention(32, heads=4)
    >>> out = attn(glo, loc, (2, 2), window="contiguous", q_order="strided", kv_order="contiguous")
    >>> out.shape                                                         # (B, Ht*Wt, D)
    torch.Size([2, 64, 32])
"""

from __future__ import annotations

import typing

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import public
from .._validation import as_int
from ..ops.crop import merge, permute_windows
from ..ops.geometry import WindowKind, check_window_stacks
from .functional import OutOrder, as_scale, check_options, project_attend

__all__ = ["WindowCrossAttention"]


class WindowCrossAttention(nn.Module):
    """Module form of :func:`window_cross_attention` with the released residual + LayerNorm.

    Parameters: ``linears.0..3`` = q, k, v, out ``Linear(dim, dim)`` with bias (the released key
    order), and ``ln`` = ``LayerNorm(dim)`` when ``residual_norm=True``, giving
    ``ln(out_proj(attn) + query)`` -- the residual is the *un-projected* query input, as released.
    Forward: ``query_feats, kv_feats`` ``(B*N, ht*wt, D)`` -> ``(B, Ht*Wt, D)`` (``out_order="map"``)
    or ``(B*N, ht*wt, D)`` in a window order.

    Example::

        >>> attn = WindowCrossAttention(64, heads=2)
        >>> x = torch.randn(4, 25, 64)                                  # B=1, grid 2x2, 5x5 tiles
        >>> attn(x, x, (2, 2), window="strided", q_order="contiguous", kv_order="strided").shape
        torch.Size([1, 100, 64])
    """

    @public(name="WindowCrossAttention")
    def __init__(self, dim: int, heads: int = 8, *, residual_norm: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        dim, heads = as_int(dim, "dim", example="dim=1024"), as_int(heads, "heads", example="heads=8")
        if dim % heads:
            raise ValueError(
                f"dim={dim!r}, heads={heads!r}; heads must be a positive int dividing dim (e.g. dim=1024, heads=8)."
            )
        self.dim, self.heads, self.residual_norm = dim, heads, residual_norm
        self.linears = nn.ModuleList(nn.Linear(dim, dim, device=device, dtype=dtype) for _ in range(4))
        self.ln = nn.LayerNorm(dim, device=device, dtype=dtype) if residual_norm else None

    @public(name="WindowCrossAttention")
    def forward(
        self,
        query_feats: torch.Tensor,
        kv_feats: torch.Tensor,
        grid,
        *,
        window: WindowKind,
        q_order: WindowKind,
        kv_order: WindowKind,
        out_order: OutOrder = "map",
        tile_size=None,
        backend: str = "auto",
    ) -> torch.Tensor:
        """Windowed cross-attention, then ``ln(out_proj(attn) + query)`` (or ``out_proj(attn)`` without ``ln``).

        Args:
            query_feats: ``(B*N, ht*wt, D)`` stack in ``q_order`` window order of the query map.
            kv_feats: ``(B*N, ht*wt, D)`` stack in ``kv_order`` window order of the key/value map.
            grid: ``(gh, gw)`` (or an int), ``N = gh*gw``.
            window: the window kind attended in, ``"contiguous"`` or ``"strided"``.
            out_order: ``"map"`` (default) or a window order for the output.
            tile_size: ``(ht, wt)``; inferred when ``ht*wt`` is a perfect square.
            backend: :func:`window_attention` backend (``"auto"`` honours :func:`attention_backend` and
                ``$HRPERC_ATTN_BACKEND``).

        Returns:
            ``(B, Ht*Wt, D)`` row-major for ``out_order="map"``, else ``(B*N, ht*wt, D)`` in that window
            order; ``Ht*Wt = N*ht*wt``.
        """
        grid, tile_size, out_order = self._check(
            query_feats, kv_feats, grid, tile_size, window, q_order, kv_order, out_order
        )
        out = self._attend(query_feats, kv_feats, grid, window, q_order, kv_order, out_order, tile_size, backend)
        lo = typing.cast(nn.Linear, self.linears[3])  # a ModuleList item is typed as a Module
        out = F.linear(out, lo.weight, lo.bias)
        if self.ln is None:
            return out
        return self.ln(out + _reorder_stack(query_feats, grid, tile_size, q_order, out_order))

    @public(name="WindowCrossAttention")
    def attend(
        self,
        query_feats: torch.Tensor,
        kv_feats: torch.Tensor,
        grid,
        *,
        window: WindowKind,
        q_order: WindowKind,
        kv_order: WindowKind,
        out_order: OutOrder = "map",
        tile_size=None,
        backend: str = "auto",
    ) -> torch.Tensor:
        """The attention with heads merged, *before* the output projection; arguments and shapes as :meth:`forward`.

        ``forward`` is ``ln(linears[3](attend(...)) + query)``. The DEM average-pools this output before
        the (affine) output projection when nothing non-linear follows.
        """
        grid, tile_size, out_order = self._check(
            query_feats, kv_feats, grid, tile_size, window, q_order, kv_order, out_order
        )
        return self._attend(query_feats, kv_feats, grid, window, q_order, kv_order, out_order, tile_size, backend)

    def _check(self, query_feats, kv_feats, grid, tile_size, window, q_order, kv_order, out_order):
        """The one check of :meth:`forward`'s and :meth:`attend`'s arguments (the attention checks none again)."""
        grid, tile_size = check_window_stacks(
            grid, tile_size, layout="(B*N, ht*wt, D)", query_feats=query_feats, kv_feats=kv_feats
        )
        if query_feats.shape[-1] != self.dim:
            raise ValueError(
                f"inputs have D={query_feats.shape[-1]} (shape {tuple(query_feats.shape)}) but the module was "
                f"built with dim={self.dim}. Pass features of width {self.dim}, or build "
                f"WindowCrossAttention({query_feats.shape[-1]}, heads=...) for these."
            )
        return grid, tile_size, check_options(window, q_order, kv_order, out_order)

    def _attend(self, query_feats, kv_feats, grid, window, q_order, kv_order, out_order, tile_size, backend):
        lq, lk, lv, _ = self.linears
        return project_attend(
            query_feats,
            kv_feats,
            grid,
            window,
            q_order,
            kv_order,
            lq.weight,
            lq.bias,
            lk.weight,
            lk.bias,
            lv.weight,
            lv.bias,
            heads=self.heads,
            out_order=out_order,
            tile_size=tile_size,
            scale=as_scale(None, self.dim // self.heads),
            backend=backend,
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, residual_norm={self.residual_norm}"


def _reorder_stack(x, grid, tile_size, order, out_order):
    """``(B*N, T, D)`` stack in ``order`` -> ``out_order`` (a window order, or ``"map"`` ``(B, Ht*Wt, D)``)."""
    if out_order == "map":
        return merge(x, grid, order, layout="nlc", tile_size=tile_size)
    return permute_windows(x, grid, order, out_order, tile_size=tile_size)
