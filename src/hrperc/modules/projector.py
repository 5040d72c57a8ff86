"""Vision-to-language projectors with LLaVA's names (INF-LLaVA's released loader:
:func:`hrperc.pretrained.inf_llava.load_projector`).

``build_projector("mlp2x_gelu", 1024, 4096)`` is LLaVA's ``Linear -> GELU -> Linear``;
``"mlp{n}x_gelu"`` stacks ``n`` Linears with GELU between; ``"linear"`` is one Linear; ``"identity"``
passes through (``in_dim == out_dim``). Parameter names match LLaVA (``0.weight``, ``2.weight``, ...),
so ``mm_projector.*`` keys load directly.

Example::

    >>> import torch
    >>> proj = build_projector("mlp2x_gelu", 64, 128)
    >>> proj(torch.randn(2, 10, 64)).shape
    torch.Size([2, 10, 128])
"""

from __future__ import annotations

import re

from torch import nn

from .._errors import public
from .._validation import as_int

__all__ = ["build_projector"]

_MLP = re.compile(r"^mlp(\d+)x_gelu$")


@public
def build_projector(kind: str, in_dim: int, out_dim: int, *, device=None, dtype=None) -> nn.Module:
    """An ``(..., in_dim) -> (..., out_dim)`` projector named as in LLaVA's ``mm_projector_type``.

    Example::

        >>> build_projector("mlp3x_gelu", 8, 16)
        Sequential(
          (0): Linear(in_features=8, out_features=16, bias=True)
          (1): GELU(approximate='none')
          (2): Linear(in_features=16, out_features=16, bias=True)
          (3): GELU(approximate='none')
          (4): Linear(in_features=16, out_features=16, bias=True)
        )
    """
    # Not an int: TypeError, an int below 1: ValueError (as_int), as for every count in hrperc.
    in_dim = as_int(in_dim, "in_dim", example="in_dim=1024 (CLIP ViT-L's width)")
    out_dim = as_int(out_dim, "out_dim", example="out_dim=4096 (a 7B LLM's width)")
    kw = dict(device=device, dtype=dtype)
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, **kw)
    if kind == "identity":
        if in_dim != out_dim:
            raise ValueError(
                f"kind='identity' needs in_dim == out_dim, got in_dim={in_dim} and out_dim={out_dim}. Pass "
                f"out_dim={in_dim}, or a kind that changes the width such as 'linear' or 'mlp2x_gelu'."
            )
        return nn.Identity()
    match = _MLP.match(kind) if isinstance(kind, str) else None
    if match is None or int(match.group(1)) < 1:
        raise ValueError(
            f"kind={kind!r} is not a known projector; pass one of 'linear', 'identity' or 'mlp{{n}}x_gelu' "
            "(n >= 1, e.g. 'mlp2x_gelu' as in LLaVA-1.5 and INF-LLaVA)."
        )
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim, **kw)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim, **kw)]
    return nn.Sequential(*layers)
