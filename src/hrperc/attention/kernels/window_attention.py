"""Fused per-window cross-attention (INF-LLaVA DEM) as Triton kernels, forward and backward.

The DEM attends, window by window, between two token maps that a ViT returns as sub-feature stacks
in *different* window orders (local features: contiguous windows of ``F_loc``; global features:
strided windows of ``F_glo``). Gather-then-SDPA first copies every stack into the attention's window
order. These kernels instead read each window's queries, keys and values straight from the source
stacks by index arithmetic and write the output straight into the requested order, so no window
tensor, map, or permutation index is ever materialised.

File order (flash-attn style; the plain-torch reference is
:func:`hrperc.attention.reference.reference_window_attention`): ``@triton.jit`` index helper (the
window maths of :mod:`hrperc.ops.geometry`, compiled), forward kernel
(online softmax in base 2, log-sum-exp saved) -> backward kernels (``delta = rowsum(dO*O)``, dQ,
dK/dV; flash-attention-2) -> launchers -> ``torch.library`` custom ops with fake and autograd
registrations -> typed public function :func:`triton_window_attention`.

Index arithmetic: :func:`hrperc.ops.geometry.map_position` and
:func:`~hrperc.ops.geometry.window_of`, compiled with ``triton.jit`` (see that module's table); a
row-major map holds position ``(R, C)`` at row ``R*gw*tw + C``.

The kernel's limits (dtypes, head dims, the padded head dim, devices) are stated once, in
:mod:`hrperc.attention.kernels.limits`. Arguments are checked once, by :func:`hrperc.window_attention`
(which runs this kernel as its ``"triton"`` backend): the functions here take them as checked.

This module needs Triton; ``hrperc.attention.kernels`` imports it on first use, when Triton is installed.
"""

from __future__ import annotations

import contextlib
import math
import os
import types

import torch
import triton
import triton.language as tl

from ...ops import geometry
from ...ops.geometry import ORDER_CODE as _ORDER_CODE
from ...ops.geometry import Order, WindowKind, infer_tile_size
from .limits import MAX_HEAD_DIM, block_d, kernel_supports

__all__ = ["triton_window_attention", "triton_supports", "launch"]

_LOG2E = 1.4426950408889634


# Triton fixes GPU vs CPU interpreter when a kernel is decorated, i.e. when this module is imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------


def _jit_geometry(fn):
    """``triton.jit`` of an index function of :mod:`hrperc.ops.geometry` (same code, globals of its own).

    Triton's CPU interpreter refuses a function whose module globals do not hold ``triton.language``
    (and adds its own names to the globals it runs the function in), so the compiled function gets a
    copy of geometry's globals with ``tl`` added; geometry itself stays free of Triton.
    """
    copy = types.FunctionType(fn.__code__, {**fn.__globals__, "tl": tl}, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__qualname__, copy.__doc__ = fn.__qualname__, fn.__doc__
    return triton.jit(copy)


# The window index maths of hrperc.ops.geometry, compiled: one definition for Python, torch and Triton.
_window_of = _jit_geometry(geometry.window_of)
_map_position = _jit_geometry(geometry.map_position)


@triton.jit
def _token_offsets(
    w,
    t,
    stride_win,
    stride_tok,
    GH: tl.constexpr,
    GW: tl.constexpr,
    TH: tl.constexpr,
    TW: tl.constexpr,
    WINDOW: tl.constexpr,
    ORDER: tl.constexpr,
):
    """Element offsets (inside one image, one head) of tokens ``t`` of window ``w`` in a tensor in ORDER.

    WINDOW: 0 contiguous, 1 strided. ORDER: 0 contiguous stack, 1 strided stack, 2 row-major map.
    The index arithmetic stays in 32 bits (indices are < N*T); the (window, token) indices are widened
    to int64 before the stride multiplications, so offsets past 2**31 elements do not wrap.
    """
    if ORDER == WINDOW:
        win = w
        tok = t
    else:
        row, col = _map_position(w, t, GH, GW, TH, TW, WINDOW)
        if ORDER == 2:
            tok = row * (GW * TW) + col  # map row; the map has no window stride
        else:
            win, tok = _window_of(row, col, GH, GW, TH, TW, ORDER)
    if ORDER == 2:
        off = tok.to(tl.int64) * stride_tok
    else:
        off = win.to(tl.int64) * stride_win + tok.to(tl.int64) * stride_tok
    return off


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    if PRECISION == "upcast":
        # The Triton interpreter (3.x) miscomputes tl.dot on bf16 operands. bf16 x bf16 products are
        # exact in fp32 and tensor cores accumulate in fp32, so upcasting is the same arithmetic.
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


# Autotuning. Each kernel has a short curated list of flash-attention-style tilings, best first for
# 16-bit inputs at head dim <= 128 on sm_90: (BLOCK_M, BLOCK_N, num_warps, num_stages). Every block is
# a power of two >= 32, so every tl.dot dimension is >= 16 on real hardware. Before anything compiles,
# a shared-memory estimate drops the tilings that cannot fit (see _smem_bytes); the autotuner then
# compiles and times only what is left, once per autotune key.
_FWD_TILINGS = (
    (128, 64, 8, 3),
    (128, 128, 8, 2),
    (64, 64, 4, 3),
    (128, 32, 8, 2),
    (64, 64, 4, 2),
    (64, 32, 4, 2),
    (32, 32, 4, 2),
)
_DQ_TILINGS = (
    (128, 64, 8, 2),
    (64, 128, 8, 2),
    (64, 64, 4, 2),
    (128, 32, 8, 2),
    (32, 64, 4, 2),
    (64, 32, 4, 2),
    (32, 32, 4, 2),
)
# dK/dV: one program per key block (BLOCK_N), looping over query blocks (BLOCK_M).
_DKDV_TILINGS = (
    (64, 128, 8, 2),
    (128, 64, 8, 2),
    (64, 64, 4, 2),
    (32, 128, 8, 2),
    (64, 32, 4, 2),
    (32, 64, 4, 2),
    (32, 32, 4, 2),
)
_TILINGS = {"fwd": _FWD_TILINGS, "dq": _DQ_TILINGS, "dkdv": _DKDV_TILINGS}
# The interpreter's one configuration (the fastest there; stages mean nothing on CPU).
_INTERPRET_TILING = (64, 64, 4, 1)
#: Shared-memory budget per program for the estimate. sm_90 allows 227 KiB per block; the rest is
#: headroom for Triton's scratch buffers (layout conversions, reductions) that the estimate ignores.
SMEM_BUDGET = 200 * 1024
#: Environment variable: "0" turns autotuning off and launches one fixed configuration per (dtype, head
#: dim), the first of the curated list that fits (one compile per kernel and shape instead of up to 7).
AUTOTUNE_ENV = "HRPERC_TRITON_AUTOTUNE"


def _smem_bytes(kernel: str, block_m: int, block_n: int, num_stages: int, block_d: int, elem_size: int) -> int:
    """Estimate of one program's shared memory: the tiles it loads, the streamed ones times pipeline depth.

    Forward: the query tile once plus ``num_stages`` buffers of the key and value tiles, i.e.
    ``(BLOCK_M + 2*BLOCK_N*stages) * head_dim * elem_size``. dQ also keeps dO resident
    (``2*BLOCK_M + 2*BLOCK_N*stages``); dK/dV keeps K and V resident and streams Q and dO
    (``2*BLOCK_N + 2*BLOCK_M*stages``). ``head_dim`` is the padded BLOCK_D. Real sm_90 compiles
    (tests/_compile_sm90.py) use 0.6-1.0x of it plus at most 1 KiB of scratch: 16-bit tiles of 64+
    rows match it to the byte; small tiles and fp32 (not pipelined the same way) use less.
    """
    if kernel == "fwd":
        rows = block_m + 2 * block_n * num_stages
    elif kernel == "dq":
        rows = 2 * block_m + 2 * block_n * num_stages
    elif kernel == "dkdv":
        rows = 2 * block_n + 2 * block_m * num_stages
    else:
        raise ValueError(f"_smem_bytes: kernel={kernel!r} is not one of {tuple(_TILINGS)}.")
    return rows * block_d * elem_size


def _autotune_enabled() -> bool:
    value = os.environ.get(AUTOTUNE_ENV, "1").strip().lower()
    if value in ("0", "false", "off", "no"):
        return False
    if value in ("", "1", "true", "on", "yes"):
        return True
    raise ValueError(f"{AUTOTUNE_ENV}={value!r}: expected 1 (autotune, the default) or 0 (one fixed configuration).")


def select_configs(kernel: str, configs, block_d: int, elem_size: int, autotune: bool | None = None) -> list:
    """The configurations of ``kernel`` ("fwd", "dq", "dkdv") worth compiling for this head dim and dtype.

    Keeps those whose :func:`_smem_bytes` estimate fits :data:`SMEM_BUDGET`, in list order; with
    autotuning off (``autotune=False``, default from ``HRPERC_TRITON_AUTOTUNE``) only the first of
    them, a fixed configuration per (element size, padded head dim). Never empty: if nothing fits, the
    configuration with the smallest estimate.
    """
    autotune = _autotune_enabled() if autotune is None else autotune

    def est(c):
        return _smem_bytes(kernel, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, block_d, elem_size)

    kept = [c for c in configs if est(c) <= SMEM_BUDGET] or [min(configs, key=est)]
    return kept if autotune else kept[:1]


def _element_size(x) -> int:
    if hasattr(x, "element_size"):  # a torch.Tensor (what the launchers pass)
        return x.element_size()
    dtype = getattr(x, "dtype", None)  # e.g. a TensorDescriptor or a wrapped tensor
    if dtype is not None and hasattr(dtype, "itemsize"):
        return dtype.itemsize
    return 4  # unknown: assume the widest supported dtype (fp32), the conservative choice


def _pruner(kernel: str):
    """``early_config_prune`` for triton.autotune (3.x signature: ``(configs, named_args, **kwargs)``).

    ``named_args`` holds the positional launch arguments (Q is a tensor: its dtype gives the element
    size); ``kwargs`` the keyword ones, constexprs included (BLOCK_D, the padded head dim).
    """

    def prune(configs, named_args, **kwargs):
        padded = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        if padded is None:
            padded = block_d(MAX_HEAD_DIM)  # unknown: assume the largest
        return select_configs(kernel, configs, int(padded), _element_size(named_args.get("Q")))

    prune.__name__ = f"prune_{kernel}_configs"
    return prune


def _configs(kernel: str) -> list:
    tilings = (_INTERPRET_TILING,) if _INTERPRET else _TILINGS[kernel]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in tilings]


_AUTOTUNE_KEY = ["TH", "TW", "GH", "GW", "BLOCK_D", "WINDOW", "Q_ORDER", "KV_ORDER"]


@triton.autotune(configs=_configs("fwd"), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _pruner("fwd")})
@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    qk_scale,
    sq_img,
    sq_win,
    sq_tok,
    sq_head,
    sq_dim,
    sk_img,
    sk_win,
    sk_tok,
    sk_head,
    sk_dim,
    sv_img,
    sv_win,
    sv_tok,
    sv_head,
    sv_dim,
    so_img,
    so_win,
    so_tok,
    so_head,
    so_dim,
    HEADS,
    HEAD_DIM,
    GH: tl.constexpr,
    GW: tl.constexpr,
    TH: tl.constexpr,
    TW: tl.constexpr,
    WINDOW: tl.constexpr,
    Q_ORDER: tl.constexpr,
    KV_ORDER: tl.constexpr,
    O_ORDER: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    T: tl.constexpr = TH * TW
    pid_m = tl.program_id(0)
    w = tl.program_id(1) // HEADS  # int32: feeds the index arithmetic, widened in _token_offsets
    h = (tl.program_id(1) % HEADS).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dl = offs_d.to(tl.int64)  # channel offsets, 64-bit for the stride products
    mask_m = offs_m < T
    mask_d = offs_d < HEAD_DIM

    q_ptrs = Q + b * sq_img + h * sq_head
    q_ptrs += _token_offsets(w, offs_m, sq_win, sq_tok, GH, GW, TH, TW, WINDOW, Q_ORDER)[:, None]
    q = tl.load(q_ptrs + offs_dl[None, :] * sq_dim, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    k_base = K + b * sk_img + h * sk_head
    v_base = V + b * sv_img + h * sv_head

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, T, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < T
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k_off = _token_offsets(w, offs_n, sk_win, sk_tok, GH, GW, TH, TW, WINDOW, KV_ORDER)
        v_off = _token_offsets(w, offs_n, sv_win, sv_tok, GH, GW, TH, TW, WINDOW, KV_ORDER)
        k = tl.load(k_base + k_off[:, None] + offs_dl[None, :] * sk_dim, mask=kv_mask, other=0.0)
        v = tl.load(v_base + v_off[:, None] + offs_dl[None, :] * sv_dim, mask=kv_mask, other=0.0)
        # Scores in base 2: qk_scale already holds log2(e), so exp2 gives the natural softmax.
        s = _dot(q, tl.trans(k), PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    lse_ptrs = LSE + ((b * (GH * GW) + w) * HEADS + h) * T + offs_m
    tl.store(lse_ptrs, m_i + tl.math.log2(l_i), mask=mask_m)
    o_ptrs = O + b * so_img + h * so_head
    o_ptrs += _token_offsets(w, offs_m, so_win, so_tok, GH, GW, TH, TW, WINDOW, O_ORDER)[:, None]
    tl.store(o_ptrs + offs_dl[None, :] * so_dim, acc.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _bwd_preprocess_kernel(
    O,
    DO,
    DELTA,
    so_img,
    so_win,
    so_tok,
    so_head,
    so_dim,
    sdo_img,
    sdo_win,
    sdo_tok,
    sdo_head,
    sdo_dim,
    HEADS,
    HEAD_DIM,
    GH: tl.constexpr,
    GW: tl.constexpr,
    TH: tl.constexpr,
    TW: tl.constexpr,
    WINDOW: tl.constexpr,
    O_ORDER: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O), per window token and head, in window order (like the LSE)."""
    T: tl.constexpr = TH * TW
    pid_m = tl.program_id(0)
    w = tl.program_id(1) // HEADS  # int32: feeds the index arithmetic, widened in _token_offsets
    h = (tl.program_id(1) % HEADS).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dl = offs_d.to(tl.int64)  # channel offsets, 64-bit for the stride products
    mask = (offs_m < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o_off = _token_offsets(w, offs_m, so_win, so_tok, GH, GW, TH, TW, WINDOW, O_ORDER)
    do_off = _token_offsets(w, offs_m, sdo_win, sdo_tok, GH, GW, TH, TW, WINDOW, O_ORDER)
    o = tl.load(O + b * so_img + h * so_head + o_off[:, None] + offs_dl[None, :] * so_dim, mask=mask, other=0.0)
    do = tl.load(DO + b * sdo_img + h * sdo_head + do_off[:, None] + offs_dl[None, :] * sdo_dim, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + ((b * (GH * GW) + w) * HEADS + h) * T + offs_m, delta, mask=offs_m < T)


@triton.autotune(configs=_configs("dq"), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _pruner("dq")})
@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    qk_scale,
    sm_scale,
    sq_img,
    sq_win,
    sq_tok,
    sq_head,
    sq_dim,
    sk_img,
    sk_win,
    sk_tok,
    sk_head,
    sk_dim,
    sv_img,
    sv_win,
    sv_tok,
    sv_head,
    sv_dim,
    sdo_img,
    sdo_win,
    sdo_tok,
    sdo_head,
    sdo_dim,
    sdq_img,
    sdq_win,
    sdq_tok,
    sdq_head,
    sdq_dim,
    HEADS,
    HEAD_DIM,
    GH: tl.constexpr,
    GW: tl.constexpr,
    TH: tl.constexpr,
    TW: tl.constexpr,
    WINDOW: tl.constexpr,
    Q_ORDER: tl.constexpr,
    KV_ORDER: tl.constexpr,
    O_ORDER: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dQ for one query block: dQ = scale * sum_n P * (dP - delta) K, P rebuilt from the saved LSE."""
    T: tl.constexpr = TH * TW
    pid_m = tl.program_id(0)
    w = tl.program_id(1) // HEADS  # int32: feeds the index arithmetic, widened in _token_offsets
    h = (tl.program_id(1) % HEADS).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dl = offs_d.to(tl.int64)  # channel offsets, 64-bit for the stride products
    mask_m = offs_m < T
    mask_d = offs_d < HEAD_DIM
    mask_md = mask_m[:, None] & mask_d[None, :]

    q_off = _token_offsets(w, offs_m, sq_win, sq_tok, GH, GW, TH, TW, WINDOW, Q_ORDER)
    q = tl.load(Q + b * sq_img + h * sq_head + q_off[:, None] + offs_dl[None, :] * sq_dim, mask=mask_md, other=0.0)
    do_off = _token_offsets(w, offs_m, sdo_win, sdo_tok, GH, GW, TH, TW, WINDOW, O_ORDER)
    do = tl.load(
        DO + b * sdo_img + h * sdo_head + do_off[:, None] + offs_dl[None, :] * sdo_dim, mask=mask_md, other=0.0
    )
    row = ((b * (GH * GW) + w) * HEADS + h) * T + offs_m
    lse = tl.load(LSE + row, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + row, mask=mask_m, other=0.0)
    k_base = K + b * sk_img + h * sk_head
    v_base = V + b * sv_img + h * sv_head

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, T, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < T
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k_off = _token_offsets(w, offs_n, sk_win, sk_tok, GH, GW, TH, TW, WINDOW, KV_ORDER)
        v_off = _token_offsets(w, offs_n, sv_win, sv_tok, GH, GW, TH, TW, WINDOW, KV_ORDER)
        k = tl.load(k_base + k_off[:, None] + offs_dl[None, :] * sk_dim, mask=kv_mask, other=0.0)
        v = tl.load(v_base + v_off[:, None] + offs_dl[None, :] * sv_dim, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION)

    dq *= sm_scale
    dq_off = _token_offsets(w, offs_m, sdq_win, sdq_tok, GH, GW, TH, TW, WINDOW, Q_ORDER)
    dq_ptrs = DQ + b * sdq_img + h * sdq_head + dq_off[:, None] + offs_dl[None, :] * sdq_dim
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=mask_md)


@triton.autotune(configs=_configs("dkdv"), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _pruner("dkdv")})
@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    qk_scale,
    sm_scale,
    sq_img,
    sq_win,
    sq_tok,
    sq_head,
    sq_dim,
    sk_img,
    sk_win,
    sk_tok,
    sk_head,
    sk_dim,
    sv_img,
    sv_win,
    sv_tok,
    sv_head,
    sv_dim,
    sdo_img,
    sdo_win,
    sdo_tok,
    sdo_head,
    sdo_dim,
    sdk_img,
    sdk_win,
    sdk_tok,
    sdk_head,
    sdk_dim,
    sdv_img,
    sdv_win,
    sdv_tok,
    sdv_head,
    sdv_dim,
    HEADS,
    HEAD_DIM,
    GH: tl.constexpr,
    GW: tl.constexpr,
    TH: tl.constexpr,
    TW: tl.constexpr,
    WINDOW: tl.constexpr,
    Q_ORDER: tl.constexpr,
    KV_ORDER: tl.constexpr,
    O_ORDER: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dK, dV for one key block, looping over the window's query blocks (transposed products)."""
    T: tl.constexpr = TH * TW
    pid_n = tl.program_id(0)
    w = tl.program_id(1) // HEADS  # int32: feeds the index arithmetic, widened in _token_offsets
    h = (tl.program_id(1) % HEADS).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dl = offs_d.to(tl.int64)  # channel offsets, 64-bit for the stride products
    mask_n = offs_n < T
    mask_d = offs_d < HEAD_DIM
    mask_nd = mask_n[:, None] & mask_d[None, :]

    k_off = _token_offsets(w, offs_n, sk_win, sk_tok, GH, GW, TH, TW, WINDOW, KV_ORDER)
    v_off = _token_offsets(w, offs_n, sv_win, sv_tok, GH, GW, TH, TW, WINDOW, KV_ORDER)
    k = tl.load(K + b * sk_img + h * sk_head + k_off[:, None] + offs_dl[None, :] * sk_dim, mask=mask_nd, other=0.0)
    v = tl.load(V + b * sv_img + h * sv_head + v_off[:, None] + offs_dl[None, :] * sv_dim, mask=mask_nd, other=0.0)
    q_base = Q + b * sq_img + h * sq_head
    do_base = DO + b * sdo_img + h * sdo_head
    row_base = ((b * (GH * GW) + w) * HEADS + h) * T

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, T, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < T
        q_off = _token_offsets(w, offs_m, sq_win, sq_tok, GH, GW, TH, TW, WINDOW, Q_ORDER)
        do_off = _token_offsets(w, offs_m, sdo_win, sdo_tok, GH, GW, TH, TW, WINDOW, O_ORDER)
        # Loaded transposed, (BLOCK_D, BLOCK_M), so every product below is a plain dot.
        qT = tl.load(
            q_base + q_off[None, :] + offs_dl[:, None] * sq_dim, mask=mask_d[:, None] & mask_m[None, :], other=0.0
        )
        do = tl.load(
            do_base + do_off[:, None] + offs_dl[None, :] * sdo_dim, mask=mask_m[:, None] & mask_d[None, :], other=0.0
        )
        lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)
        sT = _dot(k, qT, PRECISION) * qk_scale
        pT = tl.math.exp2(sT - lse[None, :])
        pT = tl.where(mask_m[None, :], pT, 0.0)
        dv += _dot(pT.to(do.dtype), do, PRECISION)
        dpT = _dot(v, tl.trans(do), PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk += _dot(dsT.to(qT.dtype), tl.trans(qT), PRECISION)

    dk *= sm_scale
    dk_off = _token_offsets(w, offs_n, sdk_win, sdk_tok, GH, GW, TH, TW, WINDOW, KV_ORDER)
    dv_off = _token_offsets(w, offs_n, sdv_win, sdv_tok, GH, GW, TH, TW, WINDOW, KV_ORDER)
    dk_ptrs = DK + b * sdk_img + h * sdk_head + dk_off[:, None] + offs_dl[None, :] * sdk_dim
    dv_ptrs = DV + b * sdv_img + h * sdv_head + dv_off[:, None] + offs_dl[None, :] * sdv_dim
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask_nd)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------


def _strides(x: torch.Tensor, order: str, n: int) -> tuple[int, int, int, int, int]:
    """(per image, per sub-image, per token, per head, per channel) element strides of ``x`` in ``order``."""
    s0, s1, s2, s3 = x.stride()
    if order == "map":  # (B, Ht*Wt, H, D): tokens are addressed by their map row
        return s0, 0, s1, s2, s3
    return n * s0, s0, s1, s2, s3  # (B*N, T, H, D): sub-image k of image b at b*N + k


def _meta(q, grid, tile_size, window, q_order, kv_order, out_order):
    gh, gw = grid
    th, tw = tile_size
    n = gh * gw
    batch = q.shape[0] if q_order == "map" else q.shape[0] // n
    return dict(
        GH=gh,
        GW=gw,
        TH=th,
        TW=tw,
        WINDOW=_ORDER_CODE[window],
        Q_ORDER=_ORDER_CODE[q_order],
        KV_ORDER=_ORDER_CODE[kv_order],
        O_ORDER=_ORDER_CODE[out_order],
        PRECISION=_dot_precision(q.dtype),
        BLOCK_D=block_d(q.shape[-1]),
    ), batch


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "ieee"  # not TF32: fp32 callers get fp32 products
    if dtype == torch.bfloat16 and _INTERPRET:
        return "upcast"
    return "tf32"  # ignored for fp16/bf16 operands


def _launch_grid(batch, n, heads, block_key):
    return lambda meta: (triton.cdiv(meta["TH"] * meta["TW"], meta[block_key]), n * heads, batch)


def _out_shape(q, batch, n, t, order):
    heads, dim = q.shape[-2:]
    return (batch, n * t, heads, dim) if order == "map" else (batch * n, t, heads, dim)


def _forward(q, k, v, grid, tile_size, window, q_order, kv_order, out_order, scale):
    meta, batch = _meta(q, grid, tile_size, window, q_order, kv_order, out_order)
    n, t = grid[0] * grid[1], tile_size[0] * tile_size[1]
    heads, dim = q.shape[-2:]
    out = q.new_empty(_out_shape(q, batch, n, t, out_order))
    lse = torch.empty(batch * n, heads, t, device=q.device, dtype=torch.float32)
    with _device_context(q):
        _fwd_kernel[_launch_grid(batch, n, heads, "BLOCK_M")](
            q,
            k,
            v,
            out,
            lse,
            scale * _LOG2E,
            *_strides(q, q_order, n),
            *_strides(k, kv_order, n),
            *_strides(v, kv_order, n),
            *_strides(out, out_order, n),
            heads,
            dim,
            **meta,
        )
    return out, lse


def _backward(grad_out, q, k, v, out, lse, grid, tile_size, window, q_order, kv_order, out_order, scale):
    meta, batch = _meta(q, grid, tile_size, window, q_order, kv_order, out_order)
    n, t = grid[0] * grid[1], tile_size[0] * tile_size[1]
    heads, dim = q.shape[-2:]
    # Gradients take the inputs' shapes but are written contiguous; the kernels address them by order.
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    delta = torch.empty_like(lse)
    s_q, s_k, s_v = _strides(q, q_order, n), _strides(k, kv_order, n), _strides(v, kv_order, n)
    s_o, s_do = _strides(out, out_order, n), _strides(grad_out, out_order, n)
    with _device_context(q):
        pre_block = 64
        _bwd_preprocess_kernel[(triton.cdiv(t, pre_block), n * heads, batch)](
            out,
            grad_out,
            delta,
            *s_o,
            *s_do,
            heads,
            dim,
            GH=meta["GH"],
            GW=meta["GW"],
            TH=meta["TH"],
            TW=meta["TW"],
            WINDOW=meta["WINDOW"],
            O_ORDER=meta["O_ORDER"],
            BLOCK_D=meta["BLOCK_D"],
            BLOCK_M=pre_block,
        )
        _bwd_dq_kernel[_launch_grid(batch, n, heads, "BLOCK_M")](
            q,
            k,
            v,
            grad_out,
            lse,
            delta,
            dq,
            scale * _LOG2E,
            scale,
            *s_q,
            *s_k,
            *s_v,
            *s_do,
            *_strides(dq, q_order, n),
            heads,
            dim,
            **meta,
        )
        _bwd_dkdv_kernel[_launch_grid(batch, n, heads, "BLOCK_N")](
            q,
            k,
            v,
            grad_out,
            lse,
            delta,
            dk,
            dv,
            scale * _LOG2E,
            scale,
            *s_q,
            *s_k,
            *s_v,
            *s_do,
            *_strides(dk, kv_order, n),
            *_strides(dv, kv_order, n),
            heads,
            dim,
            **meta,
        )
    return dq, dk, dv


def _device_context(x: torch.Tensor):
    # Launch on the tensors' GPU, not the current one.
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------
# torch.library custom ops: opaque to torch.compile (fake impls give shapes), autograd registered.
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("hrperc::window_attention_fwd", mutates_args=())
def _window_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: list[int],
    tile_size: list[int],
    window: str,
    q_order: str,
    kv_order: str,
    out_order: str,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, tuple(grid), tuple(tile_size), window, q_order, kv_order, out_order, scale)


@_window_attention_fwd.register_fake
def _(q, k, v, grid, tile_size, window, q_order, kv_order, out_order, scale):
    n, t = grid[0] * grid[1], tile_size[0] * tile_size[1]
    batch = q.shape[0] if q_order == "map" else q.shape[0] // n
    out = q.new_empty(_out_shape(q, batch, n, t, out_order))
    return out, q.new_empty((batch * n, q.shape[-2], t), dtype=torch.float32)


@torch.library.custom_op("hrperc::window_attention_bwd", mutates_args=())
def _window_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grid: list[int],
    tile_size: list[int],
    window: str,
    q_order: str,
    kv_order: str,
    out_order: str,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(
        grad_out, q, k, v, out, lse, tuple(grid), tuple(tile_size), window, q_order, kv_order, out_order, scale
    )


@_window_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, grid, tile_size, window, q_order, kv_order, out_order, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, grid, tile_size, window, q_order, kv_order, out_order, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (grid, tile_size, window, q_order, kv_order, out_order, scale)
    ctx.mark_non_differentiable(lse)


def _autograd_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _window_attention_bwd(grad_out, q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None


_window_attention_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------


def triton_supports(q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None, **kw) -> str | None:
    """``None`` when the kernel can run these inputs, else the reason (the dispatch shows it to users).

    :func:`~hrperc.attention.kernels.limits.kernel_supports` in this process's Triton mode (GPU, or the
    CPU interpreter when ``TRITON_INTERPRET=1`` was set as Triton was imported).
    """
    return kernel_supports(q, interpret=_INTERPRET)


def launch(q, k, v, grid, tile_size, window, q_order, kv_order, out_order, scale) -> torch.Tensor:
    """The kernel on arguments checked and normalised by :func:`hrperc.window_attention`: nothing is checked.

    The ``"triton"`` backend's call, after the dispatch has found the inputs within the kernel's limits.
    ``grid``/``tile_size`` int pairs, the orders and ``scale`` given; shapes as :func:`triton_window_attention`.
    """
    out, _ = _window_attention_fwd(q, k, v, list(grid), list(tile_size), window, q_order, kv_order, out_order, scale)
    return out


def triton_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid,
    *,
    window: WindowKind,
    q_order: Order,
    kv_order: Order,
    out_order: Order | None = None,
    tile_size=None,
    scale: float | None = None,
) -> torch.Tensor:
    """Per-window softmax attention with the window gather and scatter fused into Triton kernels.

    For each image ``b`` and window ``w`` of kind ``window`` (``"contiguous"`` = local crop of the map,
    ``"strided"`` = strided crop), the window's queries are
    ``crop(merge(q, grid, q_order), grid, window)[b*N + w]`` and its keys/values likewise from ``k``/``v``
    in ``kv_order``; attention is unmasked with ``scale`` (default ``1/sqrt(head_dim)``). Nothing is
    gathered: the kernels address every token by index arithmetic.

    Shapes (``N = gh*gw``, ``T = th*tw``, ``Ht*Wt = N*T``):

    * an input in a window order (``"contiguous"``/``"strided"``) is a stack ``(B*N, T, heads, head_dim)``;
    * an input in ``"map"`` order is the row-major map ``(B, Ht*Wt, heads, head_dim)``;
    * the output follows ``out_order`` (default ``window``) the same way.

    Differentiable (dq, dk, dv kernels), works under ``torch.compile(fullgraph=True)`` (it is the
    ``torch.ops.hrperc.window_attention_fwd`` custom op). fp16/bf16 accumulate in fp32; fp32 uses IEEE
    (not TF32) products. Needs CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``.

    The arguments are not checked here: :func:`hrperc.window_attention` (``backend="triton"``) checks
    them, for window-order stacks. Only the kernel's limits (:func:`triton_supports`) are, since a launch
    outside them cannot run: ``NotImplementedError`` with the reason. ``grid`` is a pair ``(gh, gw)``;
    ``tile_size`` defaults to the square root of the tokens per window.

    Example (the released INF-LLaVA pairing: local queries attend in strided windows)::

        >>> q = torch.randn(9, 16, 2, 32, device="cuda", dtype=torch.bfloat16)  # local stack, 3x3 grid
        >>> kv = torch.randn(9, 16, 2, 32, device="cuda", dtype=torch.bfloat16) # global stack
        >>> out = triton_window_attention(q, kv, kv, (3, 3), window="strided", q_order="contiguous",
        ...                               kv_order="strided", out_order="map")
        >>> out.shape                                                          # (B, Ht*Wt, heads, head_dim)
        torch.Size([1, 144, 2, 32])
    """
    reason = triton_supports(q)
    if reason is not None:
        raise NotImplementedError(
            f"triton_window_attention: q {tuple(q.shape)} {q.dtype}: {reason}. Use hrperc.window_attention with "
            f"backend='sdpa' (or 'auto') for these inputs."
        )
    out_order = window if out_order is None else out_order
    if tile_size is None:
        tokens = q.shape[1] // (grid[0] * grid[1]) if q_order == "map" else q.shape[1]
        tile_size = infer_tile_size(tokens, shape=tuple(q.shape), what="tokens per window")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return launch(q, k, v, grid, tile_size, window, q_order, kv_order, out_order, scale)
