"""Vision-to-language projectors with LLaVA's names, and INF-LLaVA's released ``mm_projector`` loader.

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

from .weights import check_state_dict, load_state_dict, select_prefixed

__all__ = ["build_projector", "load_inf_llava_projector"]

_MLP = re.compile(r"^mlp(\d+)x_gelu$")


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
    fn = "build_projector"
    for name, v in (("in_dim", in_dim), ("out_dim", out_dim)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{fn}: {name}={v!r}; must be a positive int (e.g. 1024 for CLIP ViT-L).")
    kw = dict(device=device, dtype=dtype)
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, **kw)
    if kind == "identity":
        if in_dim != out_dim:
            raise ValueError(
                f"{fn}: kind='identity' needs in_dim == out_dim, got in_dim={in_dim} and out_dim={out_dim}. Pass "
                f"out_dim={in_dim}, or a kind that changes the width such as 'linear' or 'mlp2x_gelu'."
            )
        return nn.Identity()
    match = _MLP.match(kind) if isinstance(kind, str) else None
    if match is None or int(match.group(1)) < 1:
        raise ValueError(
            f"{fn}: kind={kind!r} is not a known projector; pass one of 'linear', 'identity' or 'mlp{{n}}x_gelu' "
            "(n >= 1, e.g. 'mlp2x_gelu' as in LLaVA-1.5 and INF-LLaVA)."
        )
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim, **kw)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim, **kw)]
    return nn.Sequential(*layers)


def load_inf_llava_projector(state_dict_or_path, *, allow_pickle: bool = False, device=None, dtype=None) -> nn.Module:
    """Build INF-LLaVA's ``mlp2x_gelu`` projector from ``mm_projector.{0,2}.{weight,bias}`` and load it.

    Accepts a state dict or a weight file (safetensors; torch files with ``weights_only=True`` unless
    ``allow_pickle=True``). Keys may carry any prefix ending in ``mm_projector.``; other keys of a
    full checkpoint are then ignored. Sizes are read from the weights (1024 -> 4096 as released).

    Example::

        >>> import torch
        >>> sd = {"model.mm_projector.0.weight": torch.randn(32, 16), "model.mm_projector.0.bias": torch.zeros(32),
        ...       "model.mm_projector.2.weight": torch.randn(32, 32), "model.mm_projector.2.bias": torch.zeros(32)}
        >>> load_inf_llava_projector(sd)(torch.randn(1, 5, 16)).shape
        torch.Size([1, 5, 32])
    """
    fn = "load_inf_llava_projector"
    sd = select_prefixed(load_state_dict(state_dict_or_path, allow_pickle=allow_pickle, fn=fn), "mm_projector.", fn)
    w0 = sd.get("0.weight")
    if w0 is None or w0.ndim != 2:
        raise ValueError(
            f"{fn}: no 'mm_projector.0.weight' (2-D) in the weights; found keys {sorted(sd)[:8]}. Expected "
            "mm_projector.{0,2}.{weight,bias} (LLaVA mlp2x_gelu)."
        )
    proj = build_projector("mlp2x_gelu", w0.shape[1], w0.shape[0], device=device, dtype=dtype)
    check_state_dict(sd, {k: v.shape for k, v in proj.state_dict().items()}, fn)
    proj.load_state_dict(sd, strict=True)
    return proj
