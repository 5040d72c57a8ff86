"""Compile the window-attention kernels for sm_90 (H100) without a GPU: lowering, ptxas, shared memory.

    python tests/_compile_sm90.py [--quick]

Passing the interpreter does not prove a GPU compile (tl.dot shape rules, shared-memory limits); this
runs Triton's real CUDA pipeline ahead of time (ptxas ships with Triton) at INF-LLaVA's window (24x24,
grid 3x3, 8 heads) for the (dtype, head dim) pairs in CASES, and for each kernel compiles every
configuration the autotuner would compile there, i.e. what survives the shared-memory pruning
(window_attention.select_configs), in one layout, and the first two in a second layout. Exit status 1
on any failure, including a kept configuration over the H100's shared memory. --quick: the first
pair, two configurations per kernel and layout.

Each kernel is specialised the way Triton's JIT specialises a real launch on contiguous tensors:
strides equal to 1 become constants, integers and pointers divisible by 16 are marked so. That is
what enables vectorised loads and the cp.async software pipeline, and with it the shared memory a
configuration really needs (without it, loads are not pipelined and use far less).
"""

import itertools
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # kernels must be decorated as real JIT functions
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import native_specialize_impl  # noqa: E402

from hrperc.attention.kernels import window_attention as wa  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMEM = 232448  # H100 max dynamic shared memory per block (227 KiB)
GRID, TILE, HEADS = (3, 3), (24, 24), 8  # INF-LLaVA's DEM
CODE = {"contiguous": 0, "strided": 1, "map": 2}
# fp16 and bf16 tile identically (same element size); fp32 takes twice the shared memory.
CASES = [("bf16", 128), ("bf16", 256), ("fp16", 96), ("fp16", 40), ("fp32", 40), ("fp32", 128), ("fp32", 256)]
ELEM_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
# (window, q_order, kv_order, out_order)
LAYOUTS = [("strided", "contiguous", "strided", "map"), ("contiguous", "map", "strided", "contiguous")]
# Stride-argument prefix -> which order its tensor is in (index into a layout).
_PREFIX_ORDER = {"sq": 1, "sdq": 1, "sk": 2, "sv": 2, "sdk": 2, "sdv": 2, "so": 3, "sdo": 3}
_POINTERS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")


def launch_ints(head_dim, layout):
    """The integer arguments the launchers pass for contiguous tensors of this head dim and layout."""
    gh, gw = GRID
    n, t = gh * gw, TILE[0] * TILE[1]
    values = {"HEADS": HEADS, "HEAD_DIM": head_dim}
    for prefix, which in _PREFIX_ORDER.items():
        order = layout[which]
        shape = (1, n * t, HEADS, head_dim) if order == "map" else (n, t, HEADS, head_dim)
        strides = wa._strides(torch.empty(shape, device="meta"), order, n)
        values.update({f"{prefix}_{s}": v for s, v in zip(("img", "win", "tok", "head", "dim"), strides)})
    return values


def compile_one(kernel, dtype, meta, cfg, head_dim, layout):
    jitfn = kernel.fn if hasattr(kernel, "fn") and not isinstance(kernel, triton.JITFunction) else kernel
    constexprs = {**meta, **(cfg.kwargs if cfg else {})}
    constexprs = {k: v for k, v in constexprs.items() if k in jitfn.arg_names}
    ints = launch_ints(head_dim, layout)
    sig, attrs = {}, {}
    for i, name in enumerate(jitfn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _POINTERS:
            sig[name], attrs[(i,)] = "*" + dtype, [["tt.divisibility", 16]]  # torch allocations: 256-B aligned
        elif name in ("LSE", "DELTA"):
            sig[name], attrs[(i,)] = "*fp32", [["tt.divisibility", 16]]
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:  # as the JIT does: 1 -> constant, multiple of 16 -> divisibility 16
            kind, key = native_specialize_impl(BaseBackend, ints[name], False, True, True)
            if kind == "constexpr":
                sig[name], constexprs[name] = "constexpr", key
            else:
                sig[name] = kind
                attrs.update({(i,): BaseBackend.parse_attr(key)} if key else {})
    src = ASTSource(jitfn, sig, constexprs={(jitfn.arg_names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    opts = {"num_warps": cfg.num_warps if cfg else 4, "num_stages": cfg.num_stages if cfg else 1}
    return triton.compile(src, target=TARGET, options=opts)


def meta_for(dtype, head_dim, layout):
    window, qo, ko, oo = layout
    return dict(
        GH=GRID[0],
        GW=GRID[1],
        TH=TILE[0],
        TW=TILE[1],
        WINDOW=CODE[window],
        Q_ORDER=CODE[qo],
        KV_ORDER=CODE[ko],
        O_ORDER=CODE[oo],
        PRECISION="ieee" if dtype == "fp32" else "tf32",
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
    )


def main(argv):
    quick = "--quick" in argv
    failures, too_big, n = [], [], 0
    for (dtype, head_dim), layout in itertools.product(CASES[:1] if quick else CASES, LAYOUTS):
        window = layout[0]
        meta = meta_for(dtype, head_dim, layout)
        for kernel, name in ((wa._fwd_kernel, "fwd"), (wa._bwd_dq_kernel, "dq"), (wa._bwd_dkdv_kernel, "dkdv")):
            configs = wa.select_configs(name, kernel.configs, meta["BLOCK_D"], ELEM_SIZE[dtype], autotune=True)
            if quick or layout != LAYOUTS[0]:
                configs = configs[:2]  # the index arithmetic varies with the layout; tiling with the config
            for cfg in configs:
                t0 = time.time()
                try:
                    shared = compile_one(kernel, dtype, meta, cfg, head_dim, layout).metadata.shared
                    n += 1
                    if shared > SMEM:  # the estimate let through a config that does not fit: a pruning bug
                        too_big.append((name, dtype, head_dim, window, str(cfg), f"shared {shared}"))
                except Exception as exc:  # noqa: BLE001
                    failures.append((name, dtype, head_dim, window, str(cfg), repr(exc)[:300]))
                    shared = None
                print(
                    name,
                    dtype,
                    head_dim,
                    window,
                    cfg.kwargs,
                    cfg.num_warps,
                    cfg.num_stages,
                    "shared",
                    shared,
                    f"{time.time() - t0:.1f}s",
                    flush=True,
                )
        pre = wa._bwd_preprocess_kernel
        m = {k: v for k, v in meta.items() if k in pre.arg_names}
        m["BLOCK_M"] = 64
        print("pre", dtype, head_dim, "shared", compile_one(pre, dtype, m, None, head_dim, layout).metadata.shared)
    print("compiled", n, "failures", len(failures), "kept configs over shared memory (estimate too low)", len(too_big))
    for f in too_big:
        print("OVER", f)
    for f in failures:
        print("FAIL", f)
    return 1 if failures or too_big else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
