"""Fused Triton window attention vs the alternatives, forward and forward+backward, in one run.

    python benchmarks/bench_window_attention.py [--batch 1] [--dtype bf16] [--repeats 20] [--out DIR]

Shapes default to INF-LLaVA's DEM: grid 3x3, 24x24 tokens per window (576), 8 heads x 128, the
released local-as-query direction (queries: local sub-features, contiguous order; keys/values:
global sub-features, strided order; strided windows; output the recombined map). Methods:

* ``triton``           -- the fused kernel: windows read and the map written by index arithmetic (GPU only);
* ``sdpa_pregathered`` -- SDPA on stacks already in window order (no gather; the throughput yardstick:
                          flash backend on GPU);
* ``gather_sdpa``      -- what an unfused implementation does: gather q into window order, SDPA, scatter
                          the output to the map (hrperc's ``backend="sdpa"``);
* ``flex``             -- FlexAttention over the whole token sequence with a window block mask (compiled;
                          forward only on CPU, where its backward is not supported);
* ``loop``             -- one SDPA call per window, as the research code does.

Reported per method and direction: median ms, TFLOP/s (forward 4*B*N*H*T^2*D flops, backward 2.5x
that), modelled bytes moved (docs/kernel.md), % of the device's dense peak, and speed relative to
``sdpa_pregathered`` measured in the same run. Every method's output is compared with SDPA. Before any
timing, the fused kernel's output and q/k/v gradients are held to a float64 reference with
flash-attention's rule (``|triton - ref64| <= 2 |gather_sdpa - ref64| + atol[dtype] * max(1, |ref64|)``);
if it fails, the run stops with exit status 1. Writes ``bench_window_attention.json`` and
``bench_window_attention.png``. Without a GPU the CPU methods run and the fused kernel is reported as
not run: it needs a GPU (the CPU interpreter is a correctness path).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import hrperc

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Dense (no sparsity) tensor-core peaks in TFLOP/s and HBM bandwidth in TB/s, from NVIDIA's datasheets.
PEAKS = {
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2, "tb_s": 2.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9, "tb_s": 3.35},  # SXM / HBM3
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9, "tb_s": 4.8},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5, "tb_s": 2.0},
}
WINDOW, Q_ORDER, KV_ORDER, OUT_ORDER = "strided", "contiguous", "strided", "map"
# flash-attention's tolerance rule (as tests/_tolerance.py): absolute slack per dtype, scaled by |ref|.
ATOL = {"bf16": 1e-2, "fp16": 1e-3, "fp32": 1e-5}


def device_peak(device: torch.device, dtype_name: str):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAKS.items():  # "H100 PCIe" before "H100"
        if key in name:
            return {"device": name, "tflops": peak[dtype_name], "tb_s": peak["tb_s"]}
    return {"device": name, "tflops": None, "tb_s": None}


def bench(fn, device, repeats: int) -> float:
    """Median milliseconds of ``fn()``."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=max(repeats * 5, 50), return_mode="median")
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def make_methods(q, k, v, grid, tile, device, run_flex: bool):
    """Each method maps (q, k, v) -> output in the same form (the recombined map (B, L, H, D))."""
    gh, gw = grid
    n, t = gh * gw, tile[0] * tile[1]
    heads, dim = q.shape[-2:]
    batch = q.shape[0] // n

    def to_map(out_windows):  # (B*N, T, H, D) in window order -> (B, L, H, D)
        flat = hrperc.ops.merge(out_windows.flatten(2), grid, WINDOW, layout="nlc", tile_size=tile)
        return flat.unflatten(-1, (heads, dim))

    def sdpa(qw, kw, vw):  # (B*N, T, H, D) each, window order
        if device.type == "cuda" and q.dtype != torch.float32:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qw.transpose(1, 2), kw.transpose(1, 2), vw.transpose(1, 2))
        return F.scaled_dot_product_attention(qw.transpose(1, 2), kw.transpose(1, 2), vw.transpose(1, 2))

    def gather_sdpa(q, k, v):
        qw = hrperc.permute_windows(q, grid, Q_ORDER, WINDOW)
        kw = hrperc.permute_windows(k, grid, KV_ORDER, WINDOW)  # identity here: already in window order
        vw = hrperc.permute_windows(v, grid, KV_ORDER, WINDOW)
        return to_map(sdpa(qw, kw, vw).transpose(1, 2))

    # sdpa_pregathered gets q already in window order (gathered once, outside the timing).
    q_pre = hrperc.permute_windows(q.detach(), grid, Q_ORDER, WINDOW).requires_grad_(q.requires_grad)

    def pregathered(q, k, v):
        return sdpa(q_pre, k, v)  # (B*N, H, T, D): no scatter either

    perm_q = hrperc.ops.window_permutation(grid, tile, Q_ORDER, WINDOW, device=device).view(n, t)

    def loop(q, k, v):
        qf = q.reshape(batch, n * t, heads, dim)
        outs = []
        for w in range(n):  # the research code's per-window loop, on purpose
            qw = qf.index_select(1, perm_q[w]).transpose(1, 2)
            kw = k.view(batch, n, t, heads, dim)[:, w].transpose(1, 2)
            vw = v.view(batch, n, t, heads, dim)[:, w].transpose(1, 2)
            outs.append(F.scaled_dot_product_attention(qw, kw, vw).transpose(1, 2))
        return to_map(torch.stack(outs, 1).flatten(0, 1))

    methods = {"sdpa_pregathered": pregathered, "gather_sdpa": gather_sdpa, "loop": loop}
    if device.type == "cuda":

        def fused(q, k, v):
            return hrperc.attention.kernels.triton_window_attention(
                q, k, v, grid, window=WINDOW, q_order=Q_ORDER, kv_order=KV_ORDER, out_order=OUT_ORDER
            )

        methods = {"triton": fused, **methods}
    if run_flex:
        methods["flex"] = make_flex(q, grid, tile, device)
    return methods, q_pre


def make_flex(q, grid, tile, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    gh, gw = grid
    n, t = gh * gw, tile[0] * tile[1]
    heads, dim = q.shape[-2:]
    batch = q.shape[0] // n
    # Window id of each token, in each stack's own order: window w of the stack in WINDOW order holds
    # positions perm[w*t:(w+1)*t] of the stack in the source order.
    q_win = torch.empty(n * t, dtype=torch.int64, device=device)
    q_win[hrperc.ops.window_permutation(grid, tile, Q_ORDER, WINDOW, device=device)] = (
        torch.arange(n * t, device=device) // t
    )
    kv_win = torch.arange(n * t, device=device) // t  # k/v are already in the window order

    def same_window(b, h, q_idx, kv_idx):
        return q_win[q_idx] == kv_win[kv_idx]

    block_mask = create_block_mask(same_window, None, None, n * t, n * t, device=str(device))
    flex = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v):
        seq = [x.reshape(batch, n * t, heads, dim).transpose(1, 2) for x in (q, k, v)]
        out = flex(*seq, block_mask=block_mask).transpose(1, 2)  # (B, L, H, D) in q's stack order
        flat = hrperc.ops.merge(out.reshape(batch * n, t, heads * dim), grid, Q_ORDER, layout="nlc", tile_size=tile)
        return flat.unflatten(-1, (heads, dim))

    return run


def bytes_moved(method: str, size: int, lse: int) -> dict[str, int]:
    """Modelled compulsory HBM traffic (bytes); ``size`` is one of q/k/v/o, ``lse`` the fp32 row stats.

    Attention core: forward reads q, k, v and writes o (4 size + lse). Backward: the delta pass reads o
    and dO (2 size, writes delta); the dQ and dK/dV kernels read q, k, v, dO and write dq, dk, dv (7 size,
    read lse and delta): 9 size + 2 lse (o is read once, by the delta pass; dO twice, by two kernels).
    A gather or scatter of one stack is a read and a write (2 size). Released pairing: q needs a gather,
    k/v are native, the output is scattered to the map.
    """
    fwd_core, bwd_core = 4 * size + lse, 9 * size + 2 * lse
    if method in ("triton", "sdpa_pregathered"):
        return {"fwd": fwd_core, "bwd": bwd_core}
    if method == "flex":  # q is read in place, the output is in q's order and is scattered to the map
        return {"fwd": fwd_core + 2 * size, "bwd": bwd_core + 4 * size}
    # gather q (2), scatter o (2); backward: gather dO (2), scatter dq back (2)
    return {"fwd": fwd_core + 4 * size, "bwd": bwd_core + 4 * size}


def fp64_reference(q, k, v, grid, tile):
    """Float64 attention in the benchmark's pairing, output as the recombined map (B, L, H, D): the
    library's plain-torch reference backend (the spec), so the benchmark checks against the same math."""
    return hrperc.window_attention(
        q,
        k,
        v,
        grid,
        window=WINDOW,
        q_order=Q_ORDER,
        kv_order=KV_ORDER,
        out_order="map",
        tile_size=tile,
        backend="reference",
    )


def _output_and_grads(fn, q, k, v, grad):
    xs = [x.detach().requires_grad_() for x in (q, k, v)]
    out = fn(*xs)
    return (out, *torch.autograd.grad(out, xs, grad.to(out.dtype)))


def check_accuracy(candidate, baseline, reference, dtype_name: str, name: str = "triton") -> dict:
    """Hold ``candidate`` (out, dq, dk, dv) to ``reference`` (float64) with flash-attention's rule.

    ``baseline`` is the same computation by the yardstick in the same dtype (gather_sdpa): each tensor
    must satisfy ``max|cand - ref| <= 2 max|base - ref| + ATOL[dtype] * max(1, max|ref|)``. Returns the
    errors and bounds per tensor; raises ``AssertionError`` naming every tensor out of tolerance.
    """
    report, bad = {}, []
    for what, cand, base, ref in zip(("out", "dq", "dk", "dv"), candidate, baseline, reference):
        ref = ref.double()
        err = (cand.double() - ref).abs().max().item()
        err_base = (base.double() - ref).abs().max().item()
        bound = 2 * err_base + ATOL[dtype_name] * max(1.0, ref.abs().max().item())
        ok = err <= bound  # False for NaN too
        report[what] = {"max_abs_err_vs_fp64": err, "baseline_err_vs_fp64": err_base, "bound": bound, "ok": ok}
        if not ok:
            bad.append(f"{what}: error {err:.3g} > bound {bound:.3g} (gather_sdpa error {err_base:.3g})")
    if bad:
        raise AssertionError(f"{name} is out of tolerance vs the float64 reference ({dtype_name}): " + "; ".join(bad))
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--grid", type=int, nargs=2, default=(3, 3))
    ap.add_argument("--tile", type=int, nargs=2, default=(24, 24))
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--repeats", type=int, default=None, help="default: 20 on GPU, 5 on CPU")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes a while)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    repeats = args.repeats or (20 if device.type == "cuda" else 5)
    grid, tile = tuple(args.grid), tuple(args.tile)
    n, t = grid[0] * grid[1], tile[0] * tile[1]
    heads, dim = args.heads, args.head_dim
    torch.manual_seed(0)
    q, k, v = (torch.randn(args.batch * n, t, heads, dim, device=device, dtype=dtype) for _ in range(3))

    note = None
    if device.type != "cuda":
        note = (
            "No CUDA GPU: the fused Triton kernel needs a GPU and was NOT run (under TRITON_INTERPRET=1 it is a "
            "correctness path only). CPU rows compare the other methods; run on a GPU for the kernel's numbers."
        )
        print(note)
    methods, q_pre = make_methods(q, k, v, grid, tile, device, run_flex=not args.no_flex)

    flops_fwd = 4 * args.batch * n * heads * t * t * dim
    flops_bwd = 2.5 * flops_fwd
    size = q.numel() * q.element_size()
    lse = args.batch * n * heads * t * 4
    peak = device_peak(device, dtype_name)

    accuracy = None
    if "triton" in methods:
        if os.environ.get("HRPERC_TRITON_AUTOTUNE", "1") != "0":
            print(
                "Note: the first triton calls autotune the forward and both backward kernels (every configuration "
                "that fits shared memory is compiled and timed once): this takes a minute or more. "
                "HRPERC_TRITON_AUTOTUNE=0 uses one fixed configuration instead (untuned timings).",
                flush=True,
            )
        # Correctness first: output and q/k/v gradients against float64, before any timing.
        grad = torch.randn(args.batch, n * t, heads, dim, device=device, dtype=dtype)  # d(output map)
        ref64 = _output_and_grads(lambda *xs: fp64_reference(*xs, grid, tile), q.double(), k.double(), v.double(), grad)
        baseline = _output_and_grads(methods["gather_sdpa"], q, k, v, grad)
        fused = _output_and_grads(methods["triton"], q, k, v, grad)
        try:
            accuracy = check_accuracy(fused, baseline, ref64, dtype_name)
        except AssertionError as exc:
            print(f"FAIL: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(1) from exc
        print(
            "triton vs float64 (flash-attn rule): "
            + ", ".join(f"{w} {r['max_abs_err_vs_fp64']:.2e} <= {r['bound']:.2e}" for w, r in accuracy.items()),
            flush=True,
        )
        del ref64, baseline, fused, grad

    reference = methods["gather_sdpa"](q, k, v).float()

    rows = []
    for name, fn in methods.items():
        row = {"method": name}
        with torch.no_grad():
            out = fn(q, k, v)
            if name == "sdpa_pregathered":  # compare in window order
                out = hrperc.ops.merge(out.transpose(1, 2).flatten(2), grid, WINDOW, layout="nlc", tile_size=tile)
                out = out.unflatten(-1, (heads, dim))
            row["max_abs_err_vs_gather_sdpa"] = (out.float() - reference).abs().max().item()
        row["fwd_ms"] = bench(lambda fn=fn: fn(q, k, v), device, repeats)
        backward_ok = not (name == "flex" and device.type != "cuda")
        if backward_ok:
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
            if name == "sdpa_pregathered":
                q_pre.requires_grad_()
                qg = q_pre
            grad = torch.randn_like(fn(qg, kg, vg))

            def step(fn=fn, qg=qg, kg=kg, vg=vg, grad=grad):
                torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), grad)

            row["fwd_bwd_ms"] = bench(step, device, repeats)
            row["bwd_ms"] = max(row["fwd_bwd_ms"] - row["fwd_ms"], 1e-9)
        traffic = bytes_moved(name, size, lse)
        row["fwd_bytes"], row["bwd_bytes"] = traffic["fwd"], traffic["bwd"]
        row["fwd_tflops"] = flops_fwd / row["fwd_ms"] / 1e9
        if "bwd_ms" in row:
            row["bwd_tflops"] = flops_bwd / row["bwd_ms"] / 1e9
        if peak and peak["tflops"]:
            row["fwd_pct_peak"] = 100 * row["fwd_tflops"] / peak["tflops"]
            if "bwd_tflops" in row:
                row["bwd_pct_peak"] = 100 * row["bwd_tflops"] / peak["tflops"]
        rows.append(row)
        print({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)

    base = next(r for r in rows if r["method"] == "sdpa_pregathered")
    for row in rows:
        row["fwd_speed_vs_pregathered_sdpa"] = base["fwd_ms"] / row["fwd_ms"]
        if "bwd_ms" in row:
            row["bwd_speed_vs_pregathered_sdpa"] = base["bwd_ms"] / row["bwd_ms"]

    result = {
        "config": {
            "batch": args.batch,
            "grid": grid,
            "tile": tile,
            "heads": heads,
            "head_dim": dim,
            "dtype": dtype_name,
            "window": WINDOW,
            "q_order": Q_ORDER,
            "kv_order": KV_ORDER,
            "out_order": OUT_ORDER,
            "device": peak["device"] if peak else "cpu",
            "peak": peak,
            "repeats": repeats,
            "torch": torch.__version__,
            "flops_fwd": flops_fwd,
            "flops_bwd": flops_bwd,
        },
        "note": note,
        "accuracy_vs_fp64": accuracy,
        "targets": "GPU: triton fwd >= 0.8x and bwd >= 0.7x the throughput of sdpa_pregathered (flash backend)",
        "rows": rows,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_window_attention.json").write_text(json.dumps(result, indent=2))
    plot(rows, result["config"], note, out_dir / "bench_window_attention.png")
    header = ("method", "fwd ms", "bwd ms", "fwd x", "bwd x", "fwd TF/s", "max err")
    print("\n{:18s} {:>9s} {:>9s} {:>7s} {:>7s} {:>9s} {:>9s}".format(*header))
    for r in rows:
        bwd = f"{r['bwd_ms']:9.3f}" if "bwd_ms" in r else f"{'n/a':>9s}"
        bx = f"{r['bwd_speed_vs_pregathered_sdpa']:7.2f}" if "bwd_ms" in r else f"{'n/a':>7s}"
        print(
            f"{r['method']:18s} {r['fwd_ms']:9.3f} {bwd} {r['fwd_speed_vs_pregathered_sdpa']:7.2f} {bx} "
            f"{r['fwd_tflops']:9.2f} {r['max_abs_err_vs_gather_sdpa']:9.2e}"
        )
    print(f"wrote {out_dir / 'bench_window_attention.json'} and .png")
    return result


def plot(rows, config, note, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    xs = range(len(rows))
    fwd = [r["fwd_ms"] for r in rows]
    bwd = [r.get("bwd_ms", 0.0) for r in rows]
    ax.bar([x - 0.2 for x in xs], fwd, width=0.4, label="forward")
    ax.bar([x + 0.2 for x in xs], bwd, width=0.4, label="backward (fwd+bwd - fwd)")
    for x, r in zip(xs, rows):
        label = f"{r['fwd_speed_vs_pregathered_sdpa']:.2f}x"
        ax.text(x - 0.2, r["fwd_ms"], label, ha="center", va="bottom", fontsize=8)
        if "bwd_ms" in r:
            ax.text(
                x + 0.2, r["bwd_ms"], f"{r['bwd_speed_vs_pregathered_sdpa']:.2f}x", ha="center", va="bottom", fontsize=8
            )
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("ms (median); labels: speed vs sdpa_pregathered")
    title = (
        f"window attention, {config['device']}, {config['dtype']}, B={config['batch']}, grid {config['grid']}, "
        f"{config['tile'][0]}x{config['tile'][1]} tokens, {config['heads']}x{config['head_dim']}"
    )
    ax.set_title(title, fontsize=9)
    if note:
        fig.text(0.01, 0.01, "CPU run: the fused Triton kernel needs a GPU and is not shown.", fontsize=8)
    ax.legend()
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
