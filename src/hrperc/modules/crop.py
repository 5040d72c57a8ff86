"""The crops and the 2D-prior recombination as modules: :class:`LocalCrop`, :class:`StrideGlobalCrop`,
:class:`Recombine` (thin wrappers of :mod:`hrperc.ops.crop` that hold the grid and layout).

Example::

    >>> import torch, hrperc
    >>> x = torch.randn(2, 3, 336, 504)
    >>> tiles = hrperc.LocalCrop((2, 3))(x)                       # (B*N, C, h, w)
    >>> tiles.shape
    torch.Size([12, 3, 168, 168])
"""

from __future__ import annotations

import torch
from torch import nn

from .._errors import public
from .._validation import as_grid, as_pair
from ..ops.crop import Layout, _check_layout, _check_nlc_only, _crop, _merge
from ..ops.geometry import WindowKind, _resolve_tile_size, check_kind

__all__ = ["LocalCrop", "StrideGlobalCrop", "Recombine"]


class _GridModule(nn.Module):
    """The options every grid module holds; each subclass's ``__init__`` / ``forward`` is its public boundary
    (:func:`hrperc._errors.public`, named after the class), which names the errors raised here."""

    _size_arg = "size"

    def __init__(self, grid, layout: Layout = "nchw", size=None) -> None:
        super().__init__()
        self.grid = as_grid(grid)
        _check_layout(layout)
        self.layout = layout
        _check_nlc_only(size, self._size_arg, layout, "the input")
        # The default nlc size (overridable per call); None: inferred from a square token count.
        self.size = as_pair(size, self._size_arg) if size is not None else None

    def _size(self, size):
        return self.size if size is None else size

    def extra_repr(self) -> str:
        extra = f", {self._size_arg}={self.size}" if self.size is not None else ""
        return f"grid={self.grid}, layout={self.layout!r}{extra}"


class LocalCrop(_GridModule):
    """Module form of :func:`local_crop` holding ``grid``, ``layout`` and (``"nlc"`` only) ``size``.

    ``(B, C, H, W) -> (B*N, C, H//gh, W//gw)``; with ``layout="nlc"``, ``(B, H*W, C) -> (B*N, h*w, C)``
    where ``size=(H, W)`` (given here or per call to ``forward``) is needed unless ``H*W`` is square.

    Example::

        >>> LocalCrop((3, 3))(torch.randn(1, 3, 1008, 1008)).shape
        torch.Size([9, 3, 336, 336])
        >>> LocalCrop((2, 2), layout="nlc", size=(4, 6))(torch.randn(1, 24, 8)).shape
        torch.Size([4, 6, 8])
    """

    @public(name="LocalCrop")
    def __init__(self, grid, layout: Layout = "nchw", size=None) -> None:
        super().__init__(grid, layout, size)

    @public(name="LocalCrop")
    def forward(self, x: torch.Tensor, size=None) -> torch.Tensor:
        return _crop(x, self.grid, "contiguous", self.layout, self._size(size))


class StrideGlobalCrop(_GridModule):
    """Module form of :func:`stride_crop` holding ``grid``, ``layout`` and (``"nlc"`` only) ``size``.

    ``(B, C, H, W) -> (B*N, C, H//gh, W//gw)``, interleaved full-field views; other layouts as in
    :class:`LocalCrop`.

    Example::

        >>> x = torch.arange(24).reshape(1, 1, 4, 6)
        >>> StrideGlobalCrop((2, 3))(x)[4, 0]           # offsets (1, 1)
        tensor([[ 7, 10],
                [19, 22]])
    """

    @public(name="StrideGlobalCrop")
    def __init__(self, grid, layout: Layout = "nchw", size=None) -> None:
        super().__init__(grid, layout, size)

    @public(name="StrideGlobalCrop")
    def forward(self, x: torch.Tensor, size=None) -> torch.Tensor:
        return _crop(x, self.grid, "strided", self.layout, self._size(size))


class Recombine(_GridModule):
    """The 2D-prior recombination as a module: ``(B*N, ht*wt, D) -> (B, gh*ht, gw*wt, D)``.

    ``kind="contiguous"`` places local sub-features as tiles (:func:`local_merge`); ``"strided"``
    interleaves global sub-features (:func:`stride_merge`). The default ``layout="nlc"`` takes a ViT's
    token stacks and returns a channels-last map ``(B, Ht, Wt, D)``, with ``tile_size=(ht, wt)``
    (here or per call; inferred when ``ht*wt`` is square); ``layout="nchw"``/``"nhwc"`` behave like
    the merge functions and refuse ``tile_size``.

    Example::

        >>> Recombine((3, 3), "strided")(torch.randn(9, 576, 1024), tile_size=(24, 24)).shape
        torch.Size([1, 72, 72, 1024])
    """

    _size_arg = "tile_size"

    @public(name="Recombine")
    def __init__(self, grid, kind: WindowKind = "contiguous", layout: Layout = "nlc", tile_size=None) -> None:
        super().__init__(grid, layout, tile_size)
        check_kind(kind, "kind")
        self.kind = kind

    @property
    def tile_size(self):
        return self.size

    @public(name="Recombine")
    def forward(self, tiles: torch.Tensor, tile_size=None) -> torch.Tensor:
        tile_size = self._size(tile_size)
        out = _merge(tiles, self.grid, self.kind, self.layout, tile_size)
        if self.layout != "nlc":
            return out
        gh, gw = self.grid
        th, tw = _resolve_tile_size(tiles.shape[1], tile_size, shape=tuple(tiles.shape))
        return out.view(out.shape[0], gh * th, gw * tw, out.shape[-1])

    def extra_repr(self) -> str:
        extra = f", tile_size={self.size}" if self.size is not None else ""
        return f"grid={self.grid}, kind={self.kind!r}, layout={self.layout!r}{extra}"
