"""The fused Triton window-attention kernels against the float64 reference (flash-attn tolerance rule).

On CPU these run under TRITON_INTERPRET=1 (set by conftest.py before triton is imported). Shapes are
small because the interpreter costs milliseconds per program-iteration; the INF-LLaVA size is `slow`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from _messages import raises_naming
from _tolerance import assert_close_to_reference

import hrperc

pytest.importorskip("triton")

import triton  # noqa: E402

import hrperc.attention.kernels  # noqa: E402
from hrperc.attention.kernels import window_attention as wa  # noqa: E402
from hrperc.attention.reference import reference_window_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ORDER_NAMES = ("contiguous", "strided", "map")


@pytest.fixture(autouse=True)
def _one_config_per_shape(monkeypatch):
    # On a GPU every new shape would otherwise autotune (compile and time every fitting configuration of
    # three kernels). The tests check numerics, so one fixed configuration per (dtype, head dim) is
    # enough; HRPERC_TRITON_AUTOTUNE=1 in the environment tests with autotuning instead.
    monkeypatch.setenv(wa.AUTOTUNE_ENV, os.environ.get(wa.AUTOTUNE_ENV, "0"))


def _make(order, batch, grid, tile, heads, dim, dtype=torch.float64, device=DEVICE):
    n, t = grid[0] * grid[1], tile[0] * tile[1]
    shape = (batch, n * t, heads, dim) if order == "map" else (batch * n, t, heads, dim)
    return torch.randn(shape, dtype=dtype, device=device)


def _non_contiguous(x):
    """Same values, laid out as a slice of a wider buffer with heads and tokens swapped in memory."""
    wide = torch.zeros(x.shape[0], x.shape[2], x.shape[1], x.shape[3] + 7, dtype=x.dtype, device=x.device)
    wide[..., 3 : 3 + x.shape[3]] = x.transpose(1, 2)
    view = wide[..., 3 : 3 + x.shape[3]].transpose(1, 2)
    assert not view.is_contiguous() and torch.equal(view, x)
    return view


def _check_fwd_bwd(grid, tile, heads, dim, dtype, window, q_order, kv_order, out_order, non_contiguous=False, batch=2):
    kw = dict(window=window, q_order=q_order, kv_order=kv_order, out_order=out_order, tile_size=tile)
    q64 = _make(q_order, batch, grid, tile, heads, dim)
    k64 = _make(kv_order, batch, grid, tile, heads, dim)
    v64 = _make(kv_order, batch, grid, tile, heads, dim)
    results = {}
    for name, dt, fn in (
        ("ref64", torch.float64, reference_window_attention),
        ("ref_lp", dtype, reference_window_attention),
        ("fast", dtype, wa.triton_window_attention),
    ):
        xs = [x.detach().to(dt).clone().requires_grad_() for x in (q64, k64, v64)]
        inputs = [_non_contiguous(x) for x in xs] if (non_contiguous and name == "fast") else xs
        out = fn(*inputs, grid, **kw)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        grad_out = grad_out.to(device=out.device, dtype=dt)
        if non_contiguous and name == "fast":
            grad_out = _non_contiguous(grad_out)
        out.backward(grad_out)
        results[name] = (out, *[x.grad for x in xs])
    for i, what in enumerate(("out", "dq", "dk", "dv")):
        assert results["fast"][i].shape == results["ref64"][i].shape, what
        assert_close_to_reference(results["fast"][i], results["ref_lp"][i], results["ref64"][i], dtype, name=what)


# Each case: grid, tile (th, tw), heads, head_dim, dtype, window, q_order, kv_order, out_order.
# Together they cover both window kinds x every source order x every output order x every dtype, the
# awkward sizes (5x5 = 25 and 10x10 = 100 tokens, non-square 3x4 tiles, head dims 40/80/96 and the
# maximum 256, grids 3x1, 1x2, 2x1 and 2x3) and every tensor in map order. The interpreter runs one program
# per (window, batch, head), so a dtype's repeat of a shape keeps it on a small grid with one head: the
# 2-D grid and several heads are the float32 case's; the 16-bit dtypes change the loads and the
# accumulation, not the index arithmetic.
CASES = [
    ((3, 1), (5, 5), 1, 16, torch.float32, "strided", "contiguous", "strided", None),  # released: local q
    ((3, 1), (5, 5), 1, 16, torch.float32, "contiguous", "strided", "contiguous", "map"),  # released: glob q
    ((2, 3), (3, 4), 2, 40, torch.float32, "contiguous", "map", "map", "strided"),
    ((3, 1), (3, 4), 1, 40, torch.float16, "strided", "strided", "contiguous", "contiguous"),
    ((1, 2), (3, 4), 1, 40, torch.bfloat16, "contiguous", "contiguous", "strided", "map"),
    ((2, 1), (4, 4), 1, 80, torch.float16, "contiguous", "strided", "map", None),
    ((1, 2), (4, 4), 1, 80, torch.bfloat16, "strided", "map", "contiguous", "contiguous"),
    ((3, 1), (5, 5), 1, 32, torch.bfloat16, "strided", "strided", "strided", "map"),
    # 100 tokens: two query and two key blocks of 64 in the interpreter, the second ones partial.
    ((1, 2), (10, 10), 1, 16, torch.float32, "contiguous", "map", "strided", "contiguous"),
    # Head dim 96 (padded to 128) and 256 (the largest supported), fp32 and one 16-bit dtype each.
    ((2, 1), (2, 3), 2, 96, torch.float32, "strided", "contiguous", "map", "map"),
    ((2, 1), (2, 3), 1, 96, torch.float16, "contiguous", "strided", "contiguous", None),
    ((2, 1), (2, 2), 1, 256, torch.float32, "contiguous", "map", "contiguous", "strided"),
    ((2, 1), (2, 2), 1, 256, torch.bfloat16, "strided", "contiguous", "strided", "map"),
    # Every input and the output in map order: the map branch of the index arithmetic for every tensor.
    ((2, 2), (3, 3), 2, 16, torch.float32, "strided", "map", "map", "map"),
]


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: f"{c[0]}-{c[1]}-h{c[2]}x{c[3]}-{str(c[4])[6:]}-{c[5][:3]}-{c[6][:3]}-{c[7][:3]}-{str(c[8])[:3]}",
)
def test_forward_and_gradients_match_float64_reference(case):
    _check_fwd_bwd(*case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_windows_longer_than_one_block(dtype):
    # 9x8 = 72 tokens: more than one query and one key block, the last one partial, so the online
    # softmax rescaling across key blocks and the dq/dk/dv loops over several blocks are exercised.
    config = wa._configs("fwd")[0].kwargs
    assert 72 > config["BLOCK_M"] and 72 > config["BLOCK_N"] and 72 % config["BLOCK_N"] != 0
    _check_fwd_bwd((2, 1), (9, 8), 1, 16, dtype, "strided", "contiguous", "strided", "map", batch=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs_and_grad(dtype):
    # Strided (not just offset) q, k, v and dO: the kernels must honour every stride, not assume packing.
    _check_fwd_bwd((3, 1), (3, 3), 2, 40, dtype, "strided", "contiguous", "map", "map", non_contiguous=True, batch=1)


def test_independent_of_crop_module_uniform_attention_averages_window_positions():
    # With q = 0 every query attends uniformly, so the output is the mean of the window's values. Values
    # hold their own map coordinates, so the result checks the index arithmetic without hrperc.crop.
    gh, gw, th, tw = 2, 3, 3, 2
    Ht, Wt = gh * th, gw * tw
    rows, cols = torch.meshgrid(torch.arange(Ht), torch.arange(Wt), indexing="ij")
    coords = torch.stack([rows, cols], -1).reshape(1, Ht * Wt, 1, 2).float()
    v = F.pad(coords, (0, 14)).to(DEVICE)  # head dim 16; map order
    q = torch.zeros(gh * gw, th * tw, 1, 16, device=DEVICE)
    for window, expect in (
        ("contiguous", lambda a, e: (a * th + (th - 1) / 2, e * tw + (tw - 1) / 2)),
        ("strided", lambda a, e: (a + gh * (th - 1) / 2, e + gw * (tw - 1) / 2)),
    ):
        out = wa.triton_window_attention(
            q, v, v, (gh, gw), window=window, q_order="contiguous", kv_order="map", tile_size=(th, tw)
        )
        for w in range(gh * gw):
            want = torch.tensor(expect(w // gw, w % gw), device=DEVICE).expand(th * tw, 2)
            torch.testing.assert_close(out[w, :, 0, :2], want)


def test_matches_permute_windows_then_sdpa():
    # A second, independent route to the same numbers: hrperc.permute_windows + torch SDPA.
    grid, tile = (2, 2), (3, 3)
    q = _make("contiguous", 1, grid, tile, 2, 16, torch.float32)
    k = _make("strided", 1, grid, tile, 2, 16, torch.float32)
    v = _make("strided", 1, grid, tile, 2, 16, torch.float32)
    out = wa.triton_window_attention(q, k, v, grid, window="strided", q_order="contiguous", kv_order="strided")
    qw = hrperc.permute_windows(q, grid, "contiguous", "strided")
    ref = F.scaled_dot_product_attention(qw.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_saved_logsumexp_is_base2_logsumexp_of_scaled_scores():
    grid, tile = (1, 2), (2, 3)
    q, k, v = (_make("contiguous", 1, grid, tile, 2, 16, torch.float32) for _ in range(3))
    out, lse = torch.ops.hrperc.window_attention_fwd(
        q, k, v, [1, 2], [2, 3], "contiguous", "contiguous", "contiguous", "contiguous", 0.3
    )
    scores = torch.einsum("nqhd,nkhd->nhq k".replace(" ", ""), q, k) * 0.3
    torch.testing.assert_close(lse, scores.logsumexp(-1) / torch.log(torch.tensor(2.0)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, torch.einsum("nhqk,nkhd->nqhd", scores.softmax(-1), v), atol=1e-5, rtol=1e-5)


def _op_args(dtype=torch.float32):
    grid, tile = (2, 1), (2, 2)
    q = _make("strided", 1, grid, tile, 1, 16, dtype).requires_grad_()
    k = _make("map", 1, grid, tile, 1, 16, dtype).requires_grad_()
    v = _make("map", 1, grid, tile, 1, 16, dtype).requires_grad_()
    return q, k, v, [2, 1], [2, 2], "contiguous", "strided", "map", "map", 0.25


def test_opcheck_forward_op():
    torch.library.opcheck(torch.ops.hrperc.window_attention_fwd.default, _op_args())


def test_opcheck_backward_op():
    q, k, v, *rest = _op_args()
    out, lse = torch.ops.hrperc.window_attention_fwd(q, k, v, *rest)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, *rest)
    torch.library.opcheck(torch.ops.hrperc.window_attention_bwd.default, args)


def _has_cxx_compiler():
    return any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_forward_and_backward(backend):
    # aot_eager traces the whole graph (dynamo + AOTAutograd through the fake impls and the registered
    # autograd) without generating code; inductor (the default backend) generates the code around the op
    # (C++ on CPU, Triton on GPU, ~10 s on CPU with a cold cache). Either way the custom ops stay opaque,
    # forward and backward.
    if backend == "inductor" and DEVICE == "cpu" and not _has_cxx_compiler():
        pytest.skip("inductor on CPU needs a C++ compiler")
    q, k, v, *_ = _op_args()

    def block(q, k, v):
        out = wa.triton_window_attention(
            q * 2, k.sin(), v, (2, 1), window="contiguous", q_order="strided", kv_order="map", out_order="map"
        )
        return (out.float() ** 2).sum()

    compiled = torch.compile(block, fullgraph=True, backend=backend)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_ref = block(q, k, v)
    grads_ref = torch.autograd.grad(loss_ref, (q, k, v))
    torch.testing.assert_close(loss, loss_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


def test_errors_name_argument_value_and_fix():
    # The kernel takes its arguments checked: hrperc.window_attention checks them, once, for every backend,
    # and a forced "triton" refuses what the kernel's limits exclude before anything launches.
    q = torch.randn(4, 9, 2, 16, device=DEVICE)

    def call(*args, **kw):
        return hrperc.window_attention(*args, backend="triton", **kw)

    with raises_naming(ValueError, "window_attention", "window='diagonal'"):
        call(q, q, q, (2, 2), window="diagonal", q_order="contiguous", kv_order="contiguous")
    with raises_naming(ValueError, "window_attention", "kv_order='nchw'"):
        call(q, q, q, (2, 2), window="strided", q_order="contiguous", kv_order="nchw")
    with raises_naming(ValueError, "(4, 16, 2, 16)", "(4, 9, 2, 16)", "same shape"):
        call(
            q,
            torch.randn(4, 16, 2, 16, device=DEVICE),
            q,
            (2, 2),
            window="strided",
            q_order="contiguous",
            kv_order="contiguous",
        )
    with raises_naming(ValueError, "(4, 9, 2, 16)", "N = gh*gw = 3", "grid"):
        call(q, q, q, (3, 1), window="strided", q_order="contiguous", kv_order="contiguous")
    with raises_naming(ValueError, "(4, 8, 2, 16)", "8 tokens", "tile_size="):
        call(q[:, :8], q[:, :8], q[:, :8], (2, 2), window="strided", q_order="contiguous", kv_order="contiguous")
    with raises_naming(TypeError, "torch.float32/torch.float16/torch.float32", "k.to(q)"):
        call(q, q.half(), q, (2, 2), window="strided", q_order="contiguous", kv_order="contiguous")
    with raises_naming(TypeError, "scale='0.5'", "finite float"):
        call(q, q, q, (2, 2), window="strided", q_order="contiguous", kv_order="contiguous", scale="0.5")
    with raises_naming(ValueError, "scale=inf", "finite float"):
        call(q, q, q, (2, 2), window="strided", q_order="contiguous", kv_order="contiguous", scale=float("inf"))
    with raises_naming(
        NotImplementedError, "'triton'", "torch.int64", "(torch.float16, torch.bfloat16, torch.float32)"
    ):
        call(q.long(), q.long(), q.long(), (2, 2), window="strided", q_order="contiguous", kv_order="contiguous")
    with pytest.raises(ValueError, match=r"q has shape \(4, 9, 32\)"):
        call(q.flatten(2), q, q, (2, 2), window="strided", q_order="contiguous", kv_order="contiguous")
    # Called directly, the kernel still refuses inputs outside its limits (limits.kernel_supports), naming them.
    wide = torch.randn(4, 9, 1, 512, device=DEVICE)
    with raises_naming(NotImplementedError, "(4, 9, 1, 512)", "head_dim 512 exceeds 256", "backend='sdpa'"):
        wa.triton_window_attention(
            wide, wide, wide, (2, 2), window="strided", q_order="contiguous", kv_order="contiguous"
        )
    with raises_naming(NotImplementedError, "torch.int64", "(torch.float16, torch.bfloat16, torch.float32)"):
        wa.triton_window_attention(
            q.long(), q, q, (2, 2), window="strided", q_order="contiguous", kv_order="contiguous"
        )


def test_cpu_without_interpreter_is_reported_unsupported():
    # TRITON_INTERPRET is read when triton is imported, so a fresh interpreter without it: CPU tensors are
    # refused with the reason, by the kernel itself and by a forced "triton" backend ($HRPERC_ATTN_BACKEND).
    code = (
        "import torch, hrperc\n"
        "from hrperc.attention.kernels import window_attention as wa\n"
        "reason = wa.triton_supports(torch.zeros(1, 4, 1, 16))\n"
        "assert reason is not None and 'CUDA' in reason and 'TRITON_INTERPRET=1' in reason, reason\n"
        "x = torch.zeros(4, 4, 1, 16)\n"
        "kw = dict(window='strided', q_order='contiguous', kv_order='contiguous')\n"
        "try:\n"
        "    wa.triton_window_attention(x, x, x, (2, 2), **kw)\n"
        "except NotImplementedError as exc:\n"
        "    assert '(4, 4, 1, 16)' in str(exc) and 'torch.float32' in str(exc) and reason in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('the kernel ran on CPU without the interpreter')\n"
        "q = torch.randn(6, 6, 2, 16)\n"
        "kw = dict(grid=(3, 1), tile_size=(2, 3), window='strided', q_order='contiguous', kv_order='strided',\n"
        "          out_order='strided', scale=0.25)\n"
        "try:\n"
        "    hrperc.attention.resolve_backend('auto', q, q, q, **kw)\n"
        "except NotImplementedError as exc:\n"
        "    msg = str(exc)\n"
        "    assert \"'triton'\" in msg and reason in msg and 'sdpa' in msg and \"backend='auto'\" in msg, msg\n"
        "else:\n"
        "    raise AssertionError('forced triton resolved on CPU without the interpreter')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0", "HRPERC_ATTN_BACKEND": "triton"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------
# Launch configurations: curated, pruned to shared memory before compiling, optionally fixed


def _tiling_configs(kernel):
    """The GPU configuration list of ``kernel`` (the interpreter itself runs one fixed configuration)."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
        for bm, bn, w, st in wa._TILINGS[kernel]
    ]


def _estimate(kernel, config, block_d, elem_size):
    return wa._smem_bytes(
        kernel, config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages, block_d, elem_size
    )


@pytest.mark.parametrize("kernel", ["fwd", "dq", "dkdv"])
def test_gpu_configs_are_few_hardware_valid_and_pruned_to_shared_memory(kernel):
    configs = _tiling_configs(kernel)
    assert 4 <= len(configs) <= 8
    for c in configs:
        for name in ("BLOCK_M", "BLOCK_N"):  # tl.dot on real GPUs: every dim a power of two >= 16
            block = c.kwargs[name]
            assert block >= 16 and block & (block - 1) == 0, (name, c)
        assert c.num_warps in (4, 8) and c.num_stages >= 1
    for elem_size in (2, 4):
        for block_d in (16, 32, 64, 128, 256):
            kept = wa.select_configs(kernel, configs, block_d, elem_size, autotune=True)
            assert kept, (elem_size, block_d)
            positions = [configs.index(c) for c in kept]
            assert positions == sorted(positions)  # order (preference) kept
            assert all(_estimate(kernel, c, block_d, elem_size) <= wa.SMEM_BUDGET for c in kept)
            dropped = [c for c in configs if c not in kept]
            assert all(_estimate(kernel, c, block_d, elem_size) > wa.SMEM_BUDGET for c in dropped)
            assert wa.select_configs(kernel, configs, block_d, elem_size, autotune=False) == kept[:1]
    # 16-bit inputs at head dim <= 128 (INF-LLaVA) keep the whole list; fp32 at 256 keeps the fewest.
    assert wa.select_configs(kernel, configs, 128, 2, autotune=True) == configs
    n_bf16 = len(wa.select_configs(kernel, configs, 256, 2, autotune=True))
    assert len(wa.select_configs(kernel, configs, 256, 4, autotune=True)) < n_bf16 < len(configs)


# Shared memory of real sm_90 compiles (tests/_compile_sm90.py: Triton's CUDA pipeline, ptxas included,
# specialised like a launch on contiguous tensors; INF-LLaVA window 24x24, grid 3x3, 8 heads, layout
# strided/contiguous/strided/map), measured once without a GPU: (kernel, dtype, padded head dim,
# (BLOCK_M, BLOCK_N, warps, stages), bytes). The largest kept ones, and ones the estimate drops.
SM90_SHARED_BYTES = [
    ("fwd", torch.bfloat16, 128, (128, 64, 8, 3), 131072),
    ("fwd", torch.bfloat16, 128, (128, 128, 8, 2), 163840),
    ("dq", torch.bfloat16, 128, (64, 128, 8, 2), 163840),
    ("dkdv", torch.bfloat16, 128, (128, 64, 8, 2), 164864),  # 1 KiB over the estimate: scratch
    ("dq", torch.bfloat16, 256, (64, 64, 4, 2), 196608),
    ("dkdv", torch.bfloat16, 256, (64, 64, 4, 2), 197120),
    ("dkdv", torch.bfloat16, 256, (32, 128, 8, 2), 196864),
    ("dq", torch.float32, 128, (128, 32, 8, 2), 180224),
    ("dkdv", torch.float32, 128, (32, 128, 8, 2), 180480),
    ("fwd", torch.float32, 256, (64, 32, 4, 2), 139520),
    ("dq", torch.float32, 256, (32, 32, 4, 2), 135168),
    ("dkdv", torch.float32, 256, (32, 32, 4, 2), 135424),
    ("fwd", torch.bfloat16, 256, (128, 64, 8, 3), 262144),  # dropped: over 227 KiB
    ("dkdv", torch.bfloat16, 256, (64, 128, 8, 2), 262656),  # dropped: over 227 KiB
    ("fwd", torch.bfloat16, 256, (64, 64, 4, 3), 229376),  # dropped: fits, but with 3 KiB to spare
    ("dq", torch.float32, 128, (128, 64, 8, 2), 229376),  # dropped: fits, but with 3 KiB to spare
]
H100_SHARED = 227 * 1024


@pytest.mark.parametrize("kernel,dtype,block_d,tiling,shared", SM90_SHARED_BYTES)
def test_shared_memory_estimate_against_real_sm90_compiles(kernel, dtype, block_d, tiling, shared):
    bm, bn, warps, stages = tiling
    estimate = wa._smem_bytes(kernel, bm, bn, stages, block_d, dtype.itemsize)
    # The estimate may miss scratch buffers, but by less than the headroom left under the H100 limit,
    # so a kept configuration fits, and one that does not fit is dropped.
    assert shared <= estimate + (H100_SHARED - wa.SMEM_BUDGET)
    if estimate <= wa.SMEM_BUDGET:
        assert shared <= H100_SHARED
    if shared > H100_SHARED:
        assert estimate > wa.SMEM_BUDGET


@triton.autotune(
    configs=_tiling_configs("fwd"), key=["BLOCK_D"], prune_configs_by={"early_config_prune": wa._pruner("fwd")}
)
@triton.jit
def _probe_kernel(
    Q, BLOCK_D: triton.language.constexpr, BLOCK_M: triton.language.constexpr, BLOCK_N: triton.language.constexpr
):
    pass


def test_pruner_gets_dtype_and_head_dim_from_a_real_autotuned_launch(monkeypatch):
    # Through triton.autotune itself (the early_config_prune signature changed across Triton versions):
    # with autotuning off the pruner leaves one configuration, so Triton launches it without timing.
    monkeypatch.setenv(wa.AUTOTUNE_ENV, "0")
    configs = _tiling_configs("fwd")
    for dtype, block_d in ((torch.float32, 256), (torch.bfloat16, 256), (torch.float16, 64)):
        _probe_kernel[(1,)](torch.zeros(1, dtype=dtype, device=DEVICE), BLOCK_D=block_d)
        want = wa.select_configs("fwd", configs, block_d, dtype.itemsize, autotune=False)[0]
        got = _probe_kernel.best_config
        assert (got.kwargs, got.num_warps, got.num_stages) == (want.kwargs, want.num_warps, want.num_stages)
    # Each kernel prunes by its own shared-memory rule: bf16 at head dim 256 keeps a different subset of
    # the pooled configurations for each of fwd, dq and dkdv, so a pruner wired to the wrong kernel shows.
    monkeypatch.setenv(wa.AUTOTUNE_ENV, "1")
    pooled = [c for name in ("fwd", "dq", "dkdv") for c in _tiling_configs(name)]
    q16 = torch.empty(0, dtype=torch.bfloat16)
    kept = {}
    for kernel, name in ((wa._fwd_kernel, "fwd"), (wa._bwd_dq_kernel, "dq"), (wa._bwd_dkdv_kernel, "dkdv")):
        kept[name] = kernel.early_config_prune(pooled, {"Q": q16}, BLOCK_D=256)
        assert kept[name] == wa.select_configs(name, pooled, 256, 2, autotune=True), name
    assert len({tuple(map(id, k)) for k in kept.values()}) == 3


def test_autotune_env_switch(monkeypatch):
    configs = _tiling_configs("dq")
    prune = wa._pruner("dq")
    q16 = torch.empty(0, dtype=torch.float16)
    monkeypatch.delenv(wa.AUTOTUNE_ENV, raising=False)  # default: autotune
    assert prune(configs, {"Q": q16}, BLOCK_D=64) == configs
    monkeypatch.setenv(wa.AUTOTUNE_ENV, "0")
    assert prune(configs, {"Q": q16}, BLOCK_D=64) == configs[:1]
    monkeypatch.setenv(wa.AUTOTUNE_ENV, "sometimes")
    with pytest.raises(ValueError, match=r"HRPERC_TRITON_AUTOTUNE='sometimes'.*\b1\b.*\b0\b"):
        prune(configs, {"Q": q16}, BLOCK_D=64)


@pytest.mark.cuda
def test_gpu_runs_the_fixed_configuration_when_autotune_is_off(monkeypatch):
    monkeypatch.setenv(wa.AUTOTUNE_ENV, "0")
    # A shape no other test uses, so no configuration for it is cached from an autotuned run.
    _check_fwd_bwd((1, 3), (7, 7), 2, 96, torch.bfloat16, "contiguous", "strided", "contiguous", "map", batch=1)
    for kernel, name in ((wa._fwd_kernel, "fwd"), (wa._bwd_dq_kernel, "dq"), (wa._bwd_dkdv_kernel, "dkdv")):
        want = wa.select_configs(name, kernel.configs, 128, 2, autotune=False)[0]
        got = kernel.best_config
        assert (got.kwargs, got.num_warps, got.num_stages) == (want.kwargs, want.num_warps, want.num_stages)


# ----------------------------------------------------------------------------------------------------
# 64-bit addressing and import failures


def test_offsets_past_2_to_the_31_elements_do_not_wrap():
    # k and v are views into one fp16 buffer of 2**31 + 4096 elements with a head stride of 2**30, so
    # head 2 starts at element 2**31: head * stride overflows 32-bit arithmetic (the 32-bit kernel read
    # out of bounds and crashed). torch.empty does not touch the pages, so only a few KiB are resident.
    grid, heads, dim = (2, 1), 3, 16
    shape = (2, 4, heads, dim)  # contiguous stacks of 2x2-token windows, (B*N, T, heads, head_dim)
    try:
        buf = torch.empty(2**31 + 4096, dtype=torch.float16, device=DEVICE)
    except (RuntimeError, MemoryError) as exc:  # e.g. a GPU or an overcommit policy without 4 GiB
        pytest.skip(f"cannot reserve a 4 GiB buffer: {exc}")
    strides = (4 * dim, dim, 2**30, 1)
    k = buf.as_strided(shape, strides, 0)
    v = buf.as_strided(shape, strides, 1024)
    k.copy_(torch.randn(shape))
    v.copy_(torch.randn(shape))
    q = torch.randn(shape, device=DEVICE, dtype=torch.float16)
    assert k.storage_offset() + 2 * k.stride(2) >= 2**31
    kw = dict(window="strided", q_order="contiguous", kv_order="contiguous", out_order="map")
    grad_out = torch.randn(1, 8, heads, dim, device=DEVICE, dtype=torch.float16)  # the output map, batch 1
    results = {}
    for name, fn, tensors in (
        ("fast", wa.triton_window_attention, (q, k, v)),
        ("ref_lp", reference_window_attention, [x.contiguous() for x in (q, k, v)]),
        ("ref64", reference_window_attention, [x.double() for x in (q, k, v)]),
    ):
        xs = [x.detach().requires_grad_() for x in tensors]
        out = fn(*xs, grid, **kw)
        results[name] = (out, *torch.autograd.grad(out, xs, grad_out.to(out.dtype)))
    del buf, k, v
    for i, what in enumerate(("out", "dq", "dk", "dv")):
        assert_close_to_reference(
            results["fast"][i], results["ref_lp"][i], results["ref64"][i], torch.float16, name=what
        )


def test_auto_falls_back_to_sdpa_when_triton_import_fails_with_any_error(monkeypatch):
    # A broken install can fail with RuntimeError/AttributeError, not just ImportError: "auto" must
    # fall back to SDPA, keep the reason, and a forced "triton" must report it.
    kernels = hrperc.attention.kernels

    def broken_import():
        raise RuntimeError("simulated broken Triton install: driver too old")

    monkeypatch.setattr(kernels, "_import_kernels", broken_import)
    monkeypatch.setattr(kernels, "_IMPORT_ERROR", None)
    monkeypatch.delenv("HRPERC_ATTN_BACKEND", raising=False)
    (q, k, v), grid = _attention_inputs()
    kw = _resolve_kw(grid)

    class LooksLikeCuda(torch.Tensor):  # "auto" only considers the kernel for CUDA tensors
        is_cuda = True
        device = torch.device("cuda")

    q_cuda = q.detach().as_subclass(LooksLikeCuda)
    assert q_cuda.is_cuda and q_cuda.device.type == "cuda"
    assert hrperc.attention.get_backend("triton").auto_eligible(q_cuda.device.type)
    with pytest.warns(RuntimeWarning, match="RuntimeError: simulated broken Triton install"):
        assert hrperc.attention.resolve_backend("auto", q_cuda, k, v, **kw).name == "sdpa"
    assert kernels.triton_import_error() == "RuntimeError: simulated broken Triton install: driver too old"
    assert hrperc.attention.resolve_backend("auto", q_cuda, k, v, **kw).name == "sdpa"  # remembered, no retry
    with raises_naming(
        NotImplementedError,
        "'triton'",
        "RuntimeError: simulated broken Triton install",
        "backend='sdpa'",
        "backend='auto'",
    ):
        hrperc.attention.resolve_backend("triton", q, k, v, **kw)
    with raises_naming(ImportError, "RuntimeError: simulated broken Triton install", "backend='sdpa'") as info:
        kernels.triton_window_attention(
            q, k, v, grid, window="strided", q_order="contiguous", kv_order="strided", tile_size=(2, 3)
        )
    assert isinstance(info.value.__cause__, RuntimeError)
    out = hrperc.attention.window_attention(
        q, k, v, grid, backend="auto", window="strided", q_order="contiguous", kv_order="strided", tile_size=(2, 3)
    )
    assert out.shape == q.shape


def test_hrperc_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, hrperc\n"
        "assert not hrperc.attention.kernels.HAS_TRITON\n"
        "q = torch.randn(4, 9, 1, 16)\n"
        "kw = dict(window='strided', q_order='contiguous', kv_order='contiguous')\n"
        "assert hrperc.attention.window_attention(q, q, q, (2, 2), **kw).shape == q.shape\n"
        "try:\n"
        "    hrperc.attention.window_attention(q, q, q, (2, 2), backend='triton', **kw)\n"
        "except NotImplementedError as exc:\n"
        "    assert 'pip install triton' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('forced triton backend ran without triton')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("window", ["contiguous", "strided"])
def test_inf_llava_size_bf16(window):
    # n=3 (grid 3x3), 24x24 tokens per window, 8 heads x 128: ~40 s per direction in the interpreter.
    q_order, kv_order = ("contiguous", "strided") if window == "strided" else ("strided", "contiguous")
    _check_fwd_bwd((3, 3), (24, 24), 8, 128, torch.bfloat16, window, q_order, kv_order, "map", batch=1)


@pytest.mark.slow
def test_kernels_compile_for_h100_without_gpu():
    # The interpreter does not prove a GPU compile: run Triton's real sm_90 pipeline (ptxas included)
    # ahead of time and check shared memory. Full sweep over every autotune config: drop --quick.
    script = os.path.join(os.path.dirname(__file__), "_compile_sm90.py")
    done = subprocess.run([sys.executable, script, "--quick"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "tile,dim", [((24, 24), 128), ((27, 27), 64), ((10, 10), 96), ((24, 24), 40), ((5, 5), 80), ((8, 8), 256)]
)
def test_gpu_sizes(dtype, tile, dim):
    # Compiles for real hardware (shared memory, tl.dot shapes) and checks T=576/729/100, head dims 40..256.
    _check_fwd_bwd((3, 3), tile, 4, dim, dtype, "strided", "contiguous", "strided", "map")


# ----------------------------------------------------------------------------------------------------
# Dispatch: the kernel as the "triton" backend of hrperc.window_attention


def _attention_inputs(dtype=torch.float32):
    grid, tile = (3, 1), (2, 3)
    return [_make("contiguous", 2, grid, tile, 2, 16, dtype).requires_grad_() for _ in range(3)], grid


def _resolve_kw(grid):
    """``resolve_backend``'s keyword arguments for ``_attention_inputs``."""
    return dict(
        grid=grid,
        tile_size=(2, 3),
        window="strided",
        q_order="contiguous",
        kv_order="strided",
        out_order="strided",
        scale=0.25,
    )


def test_triton_backend_matches_sdpa_backend_forward_and_backward():
    (q, k, v), grid = _attention_inputs()
    kw = dict(window="strided", q_order="contiguous", kv_order="strided", out_order="map", tile_size=(2, 3))
    outs = {}
    for backend in ("triton", "sdpa"):
        out = hrperc.attention.window_attention(q, k, v, grid, backend=backend, **kw)
        outs[backend] = (out, *torch.autograd.grad((out * out).sum(), (q, k, v)))
    for got, want in zip(outs["triton"], outs["sdpa"]):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_auto_picks_triton_only_for_cuda_and_env_var_forces_it(monkeypatch):
    (q, k, v), grid = _attention_inputs()
    kw = _resolve_kw(grid)
    resolve = hrperc.attention.resolve_backend
    monkeypatch.delenv("HRPERC_ATTN_BACKEND", raising=False)
    assert resolve("auto", q, k, v, **kw).name == ("triton" if q.is_cuda else "sdpa")
    monkeypatch.setenv("HRPERC_ATTN_BACKEND", "triton")
    assert resolve("auto", q, k, v, **kw).name == "triton"
    with hrperc.attention.attention_backend("sdpa"):
        assert resolve("auto", q, k, v, **kw).name == "sdpa"
    # Forced where the kernel cannot run (CPU without TRITON_INTERPRET=1), it raises instead: see
    # test_cpu_without_interpreter_is_reported_unsupported, which runs without the interpreter.
    assert "float64" in wa.triton_supports(q.double())


def test_window_cross_attention_module_triton_vs_sdpa():
    # The DEM's attention block end to end (projections, residual, LayerNorm) through each backend.
    attn = hrperc.attention.WindowCrossAttention(32, heads=2).to(DEVICE)
    loc, glo = (torch.randn(1 * 4, 9, 32, device=DEVICE) for _ in range(2))  # one image: batches are the kernel tests'
    results = {}
    for backend in ("triton", "sdpa"):
        attn.zero_grad()
        out = attn(loc, glo, (2, 2), window="strided", q_order="contiguous", kv_order="strided", backend=backend)
        out.square().mean().backward()
        results[backend] = [out.detach()] + [p.grad.clone() for p in attn.parameters()]
    for got, want in zip(results["triton"], results["sdpa"]):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


def test_dem_end_to_end_triton_vs_sdpa():
    # Both directions of the released DEM (fusion + reduction) through the kernel vs through SDPA.
    dem = hrperc.modules.dem.DualPerspectiveEnhancement(dim=32, heads=2, skip_unread=False, reduction="avg").to(DEVICE)
    loc, glo = (torch.randn(1 * 4, 9, 32, device=DEVICE) for _ in range(2))  # one image: batches are the kernel tests'
    results = {}
    for backend in ("triton", "sdpa"):
        dem.zero_grad()
        out = dem(loc, glo, (2, 2), backend=backend)
        out.square().mean().backward()
        results[backend] = [out.detach()] + [p.grad.clone() for p in dem.parameters() if p.grad is not None]
    assert len(results["triton"]) == len(results["sdpa"]) > 8
    for got, want in zip(results["triton"], results["sdpa"]):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)
