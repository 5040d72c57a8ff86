"""Compile the window-attention kernels for sm_90 (H100) without a GPU: lowering, ptxas, shared memory.

    python tests/_compile_sm90.py [--quick]

Passing the interpreter does not prove a GPU compile (tl.dot shape rules, shared-memory limits); this
runs Triton's real CUDA pipeline ahead of time (ptxas ships with Triton) for every autotune config at
INF-LLaVA's window (24x24, grid 3x3) and head dims 40/96/128/256. Exit status 1 on any failure.
"""
import itertools
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # kernels must be decorated as real JIT functions
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hrperc.kernels import window_attention as wa  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMEM = 232448  # H100 max dynamic shared memory per block (227 KiB)


def sig_for(jitfn, dtype, constexprs):
    sig = {}
    for name in jitfn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            sig[name] = "*" + dtype
        elif name in ("LSE", "DELTA"):
            sig[name] = "*fp32"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_one(kernel, dtype, meta, cfg):
    jitfn = kernel.fn if hasattr(kernel, "fn") and not isinstance(kernel, triton.JITFunction) else kernel
    constexprs = dict(meta)
    constexprs.update(cfg.kwargs if cfg else {})
    constexprs = {k: v for k, v in constexprs.items() if k in jitfn.arg_names}
    sig = sig_for(jitfn, dtype, constexprs)
    src = ASTSource(jitfn, sig, constexprs={(jitfn.arg_names.index(k),): v for k, v in constexprs.items()})
    opts = {"num_warps": cfg.num_warps if cfg else 4, "num_stages": cfg.num_stages if cfg else 1}
    return triton.compile(src, target=TARGET, options=opts)


quick = "--quick" in sys.argv
failures, too_big, n = [], [], 0
CASES = [("bf16", 128), ("bf16", 256), ("fp16", 96), ("fp32", 40), ("fp32", 128)]
LAYOUTS = [("strided", "contiguous", "strided", "map"), ("contiguous", "map", "strided", "contiguous")]
for (dtype, head_dim), (window, qo, ko, oo) in itertools.product(CASES[:1] if quick else CASES, LAYOUTS):
    block_d = max(16, triton.next_power_of_2(head_dim))
    code = {"contiguous": 0, "strided": 1, "map": 2}
    meta = dict(GH=3, GW=3, TH=24, TW=24, WINDOW=code[window], Q_ORDER=code[qo], KV_ORDER=code[ko], O_ORDER=code[oo],
                PRECISION="ieee" if dtype == "fp32" else "tf32", BLOCK_D=block_d)
    for kernel, name in ((wa._fwd_kernel, "fwd"), (wa._bwd_dq_kernel, "dq"), (wa._bwd_dkdv_kernel, "dkdv")):
        configs = wa._prune_configs(kernel.configs, {}, BLOCK_D=block_d)
        if quick or (window, qo) != LAYOUTS[0][:2]:
            configs = configs[:2]  # the index arithmetic varies with the layout; tiling with the config
        fitting = 0
        for cfg in configs:
            t0 = time.time()
            try:
                k = compile_one(kernel, dtype, meta, cfg)
                shared = k.metadata.shared
                n += 1
                if shared > SMEM:  # the autotuner skips such a config; fatal only if none fits (below)
                    too_big.append((name, dtype, head_dim, window, str(cfg), f"shared {shared}"))
                else:
                    fitting += 1
            except Exception as exc:  # noqa: BLE001
                failures.append((name, dtype, head_dim, window, str(cfg), repr(exc)[:300]))
                shared = None
            print(name, dtype, head_dim, window, cfg.kwargs, cfg.num_warps, cfg.num_stages, "shared", shared,
                  f"{time.time()-t0:.1f}s", flush=True)
        if not fitting:
            failures.append((name, dtype, head_dim, window, "no configuration fits in shared memory"))
    pre = wa._bwd_preprocess_kernel
    m = {k: v for k, v in meta.items() if k in pre.arg_names}
    m["BLOCK_M"] = 64
    k = compile_one(pre, dtype, m, None)
    print("pre", dtype, head_dim, "shared", k.metadata.shared)
print("compiled", n, "failures", len(failures), "configs over shared memory (skipped by autotune)", len(too_big))
for f in too_big:
    print("OVER", f)
for f in failures:
    print("FAIL", f)
sys.exit(1 if failures else 0)
