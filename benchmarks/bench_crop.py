"""Crop and merge bandwidth next to a plain ``clone()`` of the same tensor, in one run.

    python benchmarks/bench_crop.py [--repeats 7] [--out benchmarks/results]

Effective bandwidth = bytes read + bytes written (2 x tensor size) / median time. The target is each
crop/merge >= 0.5x the clone's bandwidth measured in the same run. Writes ``bench_crop.json`` and
``bench_crop.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import hrperc


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, einops pattern cache)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cases = {
        "image (4, 3, 2016, 2016) f32 nchw": (torch.randn(4, 3, 2016, 2016), "nchw"),
        "token map (4, 72, 72, 1024) f32 nhwc": (torch.randn(4, 72, 72, 1024), "nhwc"),
    }
    grid = (3, 3)
    rows = []
    for name, (x, layout) in cases.items():
        nbytes = 2 * x.numel() * x.element_size()
        t_clone = median_time(lambda x=x: x.clone(), args.repeats)
        local = hrperc.local_crop(x, grid, layout=layout)
        strided = hrperc.stride_crop(x, grid, layout=layout)
        ops = {
            "local_crop": lambda x=x, lay=layout: hrperc.local_crop(x, grid, layout=lay),
            "stride_crop": lambda x=x, lay=layout: hrperc.stride_crop(x, grid, layout=lay),
            "local_merge": lambda t=local, lay=layout: hrperc.local_merge(t, grid, layout=lay),
            "stride_merge": lambda t=strided, lay=layout: hrperc.stride_merge(t, grid, layout=lay),
        }
        clone_gbs = nbytes / t_clone / 1e9
        rows.append({"case": name, "op": "clone", "ms": t_clone * 1e3, "GB/s": clone_gbs, "x_clone": 1.0})
        for op, fn in ops.items():
            t = median_time(fn, args.repeats)
            gbs = nbytes / t / 1e9
            rows.append({"case": name, "op": op, "ms": t * 1e3, "GB/s": gbs, "x_clone": gbs / clone_gbs})
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, grid {grid}, median of {args.repeats}")
    print(f"{'case':40s} {'op':13s} {'ms':>8s} {'GB/s':>7s} {'x clone':>8s}")
    for r in rows:
        print(f"{r['case']:40s} {r['op']:13s} {r['ms']:8.2f} {r['GB/s']:7.2f} {r['x_clone']:8.2f}")
    worst = min(r["x_clone"] for r in rows if r["op"] != "clone")
    print(f"worst ratio to clone: {worst:.2f} (target >= 0.5)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_crop.json").write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 3.2))
        for ax, name in zip(axes, cases):
            sub = [r for r in rows if r["case"] == name]
            ax.bar([r["op"] for r in sub], [r["GB/s"] for r in sub], color=["grey"] + ["C0"] * 4)
            ax.set_title(name, fontsize=9)
            ax.set_ylabel("effective GB/s")
            ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        fig.tight_layout()
        fig.savefig(out / "bench_crop.png", dpi=110)
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
