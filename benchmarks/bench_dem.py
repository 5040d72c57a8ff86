"""Benchmark: hrperc's DEM against a literal per-window loop of the released math and unwindowed attention.

D=1024, 8 heads, 24x24 tokens per window, grid n x n (n = 2..6), batch 1 and 4, float32 on CPU
(bfloat16 on CUDA too when present). Implementations, side by side in one run:

* ``hrperc``      -- ``DualPerspectiveEnhancement`` released configuration, skipping unread work (default);
* ``hrperc_all``  -- the same module with ``skip_unread=False`` (every token computed);
* ``loop``        -- ``benchmarks/_released_loop.py``: the released math with a Python loop over windows;
* ``full_attn``   -- unwindowed cross-attention (SDPA over the whole map), same weights and fusion.

Per configuration, in a fresh subprocess: median time of forward (``no_grad``) and forward+backward
(gradients for the DEM parameters; the ViT features are frozen inputs), and peak extra memory of each:
the kernel's peak-RSS counter is reset (``/proc/self/clear_refs`` <- 5) right before the pass and
``VmHWM - VmRSS(before)`` is read after it (falls back to ``ru_maxrss`` deltas where not permitted).
The first (cold) pass is the memory pass; timings come from further passes, except where a pass takes
longer than ``--budget`` seconds, when the cold pass is the only sample (flagged ``samples=1``).
Analytic forward GFLOP (matmuls only) and achieved GFLOP/s are reported next to the fp32 matmul
GFLOP/s measured in the same run. Results: ``benchmarks/results/bench_dem.json`` and ``.png``.

Run (serialised with other benchmarks)::

    flock /tmp/hrperc-bench.lock .venv/bin/python benchmarks/bench_dem.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
IMPLS = ("hrperc", "hrperc_all", "loop", "full_attn")
D, HEADS, TILE = 1024, 8, 24


# ---- analytic FLOPs (forward, matmuls only: 2*M*N*K) ---------------------------------------------


def flops(impl: str, n: int, b: int) -> float:
    t = TILE * TILE
    length = n * n * t
    ffn = 2 * length * D * (D // 16) + 2 * length * (D // 16) * (D // 2)
    if impl in ("hrperc_all", "loop", "full_attn"):
        proj = 4 * 2 * length * D * D
        attn = 2 * 2 * n * n * t * t * D if impl != "full_attn" else 2 * 2 * length * length * D
        return b * (2 * (proj + attn) + 2 * ffn)
    from hrperc import DualPerspectiveEnhancement

    plan = DualPerspectiveEnhancement(D, HEADS, device="meta")._plan((n, n), (TILE, TILE))
    if plan.reads_all:  # the module computes every token (e.g. n=2: bilinear by 2 reads all of them)
        return flops("hrperc_all", n, b)
    read = len(plan.read_rows) * len(plan.read_cols)
    total = 2 * ffn * read / length
    for dp in (plan.glob, plan.loc):
        nw = len(dp.rows.windows) * len(dp.cols.windows)
        slots = nw * dp.rows.m * dp.cols.m
        total += 2 * slots * D * D + 2 * 2 * nw * t * D * D + 2 * 2 * slots * t * D + 2 * read * D * D
    return b * total


def matmul_gflops(dtype=torch.float32, device="cpu") -> float:
    a = torch.randn(5184, D, dtype=dtype, device=device)
    w = torch.randn(D, D, dtype=dtype, device=device)
    out = torch.empty(5184, D, dtype=dtype, device=device)
    times = []
    for _ in range(12):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, w, out=out)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * 5184 * D * D / statistics.median(times[2:]) / 1e9


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ---- child: one configuration in a fresh process ---------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure(fn, device):
    """Run fn once; return (seconds, peak extra MiB)."""
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, (torch.cuda.max_memory_allocated() - base) / 2**20
    resettable = _reset_peak()
    rss0 = _status_kb("VmRSS")
    max0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    if resettable:
        extra_kb = _status_kb("VmHWM") - rss0
    else:
        extra_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - max(max0, rss0)
    return dt, max(extra_kb, 0) / 1024


def child(impl: str, n: int, b: int, dtype_name: str, device: str, budget: float, reps: int) -> dict:
    from _released_loop import FullCrossAttentionDEM, ReleasedLoopDEM

    import hrperc

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    dem = hrperc.DualPerspectiveEnhancement(D, HEADS, skip_unread=impl != "hrperc_all", device=device, dtype=dtype)
    model = {"loop": ReleasedLoopDEM, "full_attn": FullCrossAttentionDEM}.get(impl, lambda m: m)(dem)
    loc = torch.randn(b * n * n, TILE * TILE, D, dtype=dtype, device=device)
    glo = torch.randn(b * n * n, TILE * TILE, D, dtype=dtype, device=device)
    grid = (n, n)

    def fwd():
        with torch.no_grad():
            model(loc, glo, grid)

    def fwd_bwd():
        model(loc, glo, grid).float().sum().backward()
        for p in dem.parameters():
            p.grad = None

    row = {"impl": impl, "n": n, "batch": b, "dtype": dtype_name, "device": device}
    for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        cold, mem = _measure(fn, device)
        samples = [cold]
        if cold < budget:
            samples = [_measure(fn, device)[0] for _ in range(reps)]
        row[f"{name}_s"] = statistics.median(samples)
        row[f"{name}_samples"] = len(samples)
        row[f"{name}_peak_mib"] = mem
    return row


# ---- parent ---------------------------------------------------------------------------------------


def run_child(impl, n, b, dtype, device, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        impl,
        str(n),
        str(b),
        dtype,
        device,
        "--budget",
        str(args.budget),
        "--reps",
        str(args.reps),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        return {"impl": impl, "n": n, "batch": b, "dtype": dtype, "device": device, "error": res.stderr[-800:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grids", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--budget", type=float, default=4.0, help="seconds; slower passes are timed once (cold)")
    ap.add_argument("--reps", type=int, default=3, help="timed passes per measurement after the cold one")
    ap.add_argument("--max-gflop", type=float, default=3000.0, help="skip configurations above this forward GFLOP")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--child", nargs=5, metavar=("IMPL", "N", "B", "DTYPE", "DEVICE"))
    args = ap.parse_args(argv)
    if args.child:
        impl, n, b, dtype, device = args.child
        print(json.dumps(child(impl, int(n), int(b), dtype, device, args.budget, args.reps)))
        return

    setups = [("float32", "cpu")]
    if torch.cuda.is_available():
        setups.append(("bfloat16", "cuda"))
    peaks = {f"{dt}/{dev}": matmul_gflops(getattr(torch, dt), dev) for dt, dev in setups}
    rows = []
    t_start = time.perf_counter()
    for dtype, device in setups:
        peak = peaks[f"{dtype}/{device}"]
        for b in args.batches:
            for n in args.grids:
                for impl in args.impls:
                    gflop = flops(impl, n, b) / 1e9
                    if gflop > args.max_gflop:
                        row = {
                            "impl": impl,
                            "n": n,
                            "batch": b,
                            "dtype": dtype,
                            "device": device,
                            "skipped": f"{gflop:.0f} GFLOP > --max-gflop {args.max_gflop:.0f}",
                        }
                    else:
                        row = run_child(impl, n, b, dtype, device, args)
                    row["gflop_fwd"] = gflop
                    if "fwd_s" in row:
                        row["gflops_fwd"] = gflop / row["fwd_s"]
                        row["gflops_fwd_bwd"] = 3 * gflop / row["fwd_bwd_s"]  # backward ~ 2x forward matmuls
                        row["fraction_of_matmul_peak_fwd"] = row["gflops_fwd"] / peak
                    rows.append(row)
                    print(_line(row), flush=True)
    _add_ratios(rows)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "matmul_gflops": peaks,
        "dim": D,
        "heads": HEADS,
        "tile": TILE,
        "wall_s": time.perf_counter() - t_start,
        "memory_method": "fresh subprocess per configuration; /proc/self/clear_refs=5 then VmHWM - VmRSS(before)",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_dem.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    _plot(rows, args.out / "bench_dem.png", peaks)
    print(_table(rows, peaks))


def _line(r) -> str:
    if "fwd_s" not in r:
        return f"{r['impl']:>10} n={r['n']} B={r['batch']}: {r.get('skipped') or r.get('error', '')[-300:]}"
    return (
        f"{r['impl']:>10} n={r['n']} B={r['batch']} {r['dtype']}: fwd {r['fwd_s'] * 1e3:8.1f} ms  fwd+bwd "
        f"{r['fwd_bwd_s'] * 1e3:8.1f} ms  peak {r['fwd_peak_mib']:7.0f}/{r['fwd_bwd_peak_mib']:7.0f} MiB  "
        f"{r['gflop_fwd']:7.1f} GFLOP  {r['gflops_fwd']:6.1f} GFLOP/s"
    )


def _add_ratios(rows):
    by = {(r["impl"], r["n"], r["batch"], r["dtype"]): r for r in rows}
    for r in rows:
        base = by.get(("loop", r["n"], r["batch"], r["dtype"]))
        if "fwd_s" in r and base and "fwd_s" in base:
            r["speedup_vs_loop_fwd"] = base["fwd_s"] / r["fwd_s"]
            r["speedup_vs_loop_fwd_bwd"] = base["fwd_bwd_s"] / r["fwd_bwd_s"]
            r["memory_vs_loop_fwd"] = r["fwd_peak_mib"] / max(base["fwd_peak_mib"], 1e-9)
            r["memory_vs_loop_fwd_bwd"] = r["fwd_bwd_peak_mib"] / max(base["fwd_bwd_peak_mib"], 1e-9)


def _table(rows, peaks) -> str:
    head = (
        "| impl | n | B | fwd ms | fwd+bwd ms | x loop fwd | x loop f+b | peak MiB fwd | peak MiB f+b | "
        "mem/loop f+b | GFLOP fwd | GFLOP/s fwd | % matmul peak |"
    )
    out = [
        "matmul peak (same run): " + ", ".join(f"{k}: {v:.0f} GFLOP/s" for k, v in peaks.items()),
        "",
        head,
        "|" + "---|" * 13,
    ]
    for r in rows:
        if "fwd_s" not in r:
            out.append(f"| {r['impl']} | {r['n']} | {r['batch']} | {r.get('skipped') or 'error'} |")
            continue
        nan = float("nan")
        out.append(
            f"| {r['impl']} | {r['n']} | {r['batch']} | {r['fwd_s'] * 1e3:.0f} | {r['fwd_bwd_s'] * 1e3:.0f} | "
            f"{r.get('speedup_vs_loop_fwd', nan):.2f} | {r.get('speedup_vs_loop_fwd_bwd', nan):.2f} | "
            f"{r['fwd_peak_mib']:.0f} | {r['fwd_bwd_peak_mib']:.0f} | {r.get('memory_vs_loop_fwd_bwd', nan):.2f} | "
            f"{r['gflop_fwd']:.1f} | {r['gflops_fwd']:.0f} | {100 * r['fraction_of_matmul_peak_fwd']:.0f} |"
        )
    return "\n".join(out)


def _plot(rows, path, peaks) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = dict(zip(IMPLS, ("tab:green", "tab:olive", "tab:red", "tab:blue")))
    labels = ("forward (no_grad) [s]", "forward + backward [s]", "peak extra memory, fwd+bwd [MiB]")
    for ax, key, label in zip(axes, ("fwd_s", "fwd_bwd_s", "fwd_bwd_peak_mib"), labels):
        for impl in IMPLS:
            for b, style in ((1, "-"), (4, "--")):
                pts = sorted((r["n"], r[key]) for r in rows if r["impl"] == impl and r["batch"] == b and key in r)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=colors[impl], label=f"{impl} B={b}")
        ax.set_xlabel("grid n (n x n windows of 24x24 tokens)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("DEM, D=1024, 8 heads; matmul peak " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
