"""flash-attn's tolerance rule, shared by every fast-path-vs-reference test (see DEVELOPERS.md)."""

from __future__ import annotations

import torch

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def assert_close_to_reference(fast, ref_lowp, ref64, dtype=None, name: str = "output", factor: float = 2.0):
    """Assert ``|fast - ref64| <= factor * |ref_lowp - ref64| + atol[dtype]`` (max-abs errors).

    ``fast`` and ``ref_lowp`` are computed in ``dtype``; ``ref64`` is the float64 reference.
    ``atol`` is scaled by the reference's magnitude so the rule is unit-free.
    """
    dtype = dtype or fast.dtype
    ref64 = ref64.double()
    scale = max(1.0, ref64.abs().max().item())
    err_fast = (fast.double() - ref64).abs().max().item()
    err_ref = (ref_lowp.double() - ref64).abs().max().item()
    bound = factor * err_ref + ATOL[dtype] * scale
    assert err_fast <= bound, (
        f"{name}: fast path error {err_fast:.3g} exceeds {factor} x reference error {err_ref:.3g} "
        f"+ atol {ATOL[dtype] * scale:.3g} in {dtype}"
    )
