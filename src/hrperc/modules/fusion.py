"""Fusion of the two enhanced maps into one (INF-LLaVA eq. 26-27, Table 5, and the released code).

Inputs are the enhanced local map and the enhanced global map as row-major token sequences
``(B, L, D)`` (``L = Ht*Wt``, or any subset of positions for the per-token modes); output ``(B, L, D)``.

==================  ===========================================================================
``released``        ``LN(cat[ffn_crop(loc), ffn_stride(glo)] + glo + loc)``, ``ffn = Linear(D, D/16)
                    -> GELU -> Linear(D/16, D/2)``; keys ``ffn_crop.*``, ``ffn_stride.*``, ``ln_fuse.*``
``linear_concat``   eq. 26-27: ``cat[Linear(D, D/2)(loc), Linear(D, D/2)(glo)]``
``add``             ``loc + glo``
``weighted_add``    ``a*loc + b*glo``, learned scalars (init 0.5, 0.5)
``multiply``        ``loc * glo``
``maxpool``         element-wise max of the two (max-pooling over the pair)
``conv3x3``         ``Conv2d(2D, D, 3, padding=1)`` on ``cat[loc, glo]`` as a map (needs ``hw``)
==================  ===========================================================================

Every mode except ``conv3x3`` works token by token (:attr:`Fusion.per_token`), which is what lets
the DEM fuse only the tokens the reduction reads.

Example::

    >>> import torch
    >>> fuse = Fusion(64, "released")
    >>> fuse(torch.randn(2, 10, 64), torch.randn(2, 10, 64)).shape
    torch.Size([2, 10, 64])
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import public
from .._validation import as_int

__all__ = ["FusionMode", "FUSIONS", "Fusion"]

FusionMode = Literal["released", "linear_concat", "add", "weighted_add", "multiply", "maxpool", "conv3x3"]
FUSIONS = ("released", "linear_concat", "add", "weighted_add", "multiply", "maxpool", "conv3x3")


def _bottleneck(dim: int, device, dtype) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, dim // 16, device=device, dtype=dtype),
        nn.GELU(),
        nn.Linear(dim // 16, dim // 2, device=device, dtype=dtype),
    )


class Fusion(nn.Module):
    """Fuse enhanced local and global tokens ``(B, L, D)`` into ``(B, L, D)``; see the module table.

    ``forward(local, global_, hw=None)``: ``hw=(Ht, Wt)`` is needed only by ``conv3x3`` (``L = Ht*Wt``).
    :attr:`per_token` and :attr:`affine` say which DEM shortcuts a mode allows.

    Example::

        >>> Fusion(32, "maxpool")(torch.zeros(1, 4, 32), torch.ones(1, 4, 32)).sum().item()
        128.0
    """

    @public(name="Fusion")
    def __init__(self, dim: int, mode: FusionMode = "released", *, device=None, dtype=None) -> None:
        super().__init__()
        if mode not in FUSIONS:
            raise ValueError(f"mode={mode!r} is not a known fusion; pass one of {FUSIONS}.")
        need = {"released": 16, "linear_concat": 2}.get(mode, 1)
        # Not an int: TypeError, an int below 1: ValueError (as_int), as for every count in hrperc.
        dim = as_int(dim, "dim", example="dim=1024")
        if dim % need:
            raise ValueError(
                f"dim={dim!r} with mode={mode!r}; dim must be a positive multiple of {need} "
                f"(the {mode} fusion uses D/{need}-wide layers). Pick e.g. dim=1024."
            )
        self.dim, self.mode = dim, mode
        kw = dict(device=device, dtype=dtype)
        if mode == "released":
            self.ffn_crop = _bottleneck(dim, device, dtype)  # local map (crop = local)
            self.ffn_stride = _bottleneck(dim, device, dtype)  # global map (strided)
            self.ln_fuse = nn.LayerNorm(dim, **kw)
        elif mode == "linear_concat":
            self.proj_local = nn.Linear(dim, dim // 2, **kw)
            self.proj_global = nn.Linear(dim, dim // 2, **kw)
        elif mode == "weighted_add":
            self.weights = nn.Parameter(torch.full((2,), 0.5, **kw))
        elif mode == "conv3x3":
            self.conv = nn.Conv2d(2 * dim, dim, 3, padding=1, **kw)

    @property
    def per_token(self) -> bool:
        """True when each output token depends only on the two input tokens at the same position."""
        return self.mode != "conv3x3"

    @property
    def affine(self) -> bool:
        """True when the fusion is an affine map per token (``linear_concat``, ``add``, ``weighted_add``).

        Such a fusion commutes with averaging over tokens, which lets the DEM pool before it.
        """
        return self.mode in ("linear_concat", "add", "weighted_add")

    @public(name="Fusion")
    def forward(self, local: torch.Tensor, global_: torch.Tensor, hw=None) -> torch.Tensor:
        """Fuse the enhanced local and global tokens.

        Args:
            local: ``(B, L, D)`` enhanced local map (row-major tokens, or any subset of positions for a
                per-token mode).
            global_: ``(B, L, D)`` enhanced global map, same positions.
            hw: ``(Ht, Wt)`` with ``Ht*Wt = L``; needed only by ``conv3x3``, ignored otherwise.

        Returns:
            ``(B, L, D)`` in the inputs' dtype.
        """
        m = self.mode
        if m == "released":
            cat = torch.cat([self.ffn_crop(local), self.ffn_stride(global_)], dim=-1)
            return self.ln_fuse(cat + global_ + local)
        if m == "linear_concat":
            return torch.cat([self.proj_local(local), self.proj_global(global_)], dim=-1)
        if m == "add":
            return local + global_
        if m == "weighted_add":
            return self.weights[0] * local + self.weights[1] * global_
        if m == "multiply":
            return local * global_
        if m == "maxpool":
            return torch.maximum(local, global_)
        if not isinstance(hw, tuple | list) or len(hw) != 2 or hw[0] * hw[1] != local.shape[1]:
            raise ValueError(
                f"mode='conv3x3' convolves the tokens as a map, so it needs hw=(Ht, Wt) with Ht*Wt = L; the "
                f"inputs have shape {tuple(local.shape)} (L = {local.shape[1]}) but hw={hw!r}. Pass the map size, "
                f"e.g. hw=(gh*ht, gw*wt) (the DEM does), or use a per-token mode such as 'linear_concat'."
            )
        b, _, d = local.shape
        x = torch.cat([local, global_], dim=-1).reshape(b, hw[0], hw[1], 2 * d).permute(0, 3, 1, 2)
        return F.conv2d(x, self.conv.weight, self.conv.bias, padding=1).flatten(2).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, mode={self.mode!r}"
