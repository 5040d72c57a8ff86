"""HighResEncoder benchmark: batched vs serial ViT passes, footprint skipping, where front-end time goes.

Run (keep the machine quiet; other engineers' benchmarks share the lock)::

    flock /tmp/hrperc-bench.lock .venv/bin/python benchmarks/bench_encoder.py [--quick]

1. The same 2N+1 = 19 sub-images (3x3 grid + thumbnail) through ViT-B/16 (224) and ViT-L/14-336, random
   weights via timm: 19 serial single-image passes vs ``HighResEncoder.encode_subimages`` with several
   ``max_batch`` values (the default first). Time (median) and peak memory, measured in this one run.
2. The released preset end to end, 1008x1008 pixels -> 576 tokens (ViT-L/14-336): footprint skipping
   (11 ViT passes) vs ``encode_all=True`` (19), identical output checked; and the share of front-end
   time spent in the ViT, the DEM and the rest (crop, gather, combine).

On a CPU both ViTs are cut to ``--depth 3`` blocks by default (a full ViT-L/14-336 pass takes many
seconds there); width, tokens, per-block cost and hence the batching ratios are those of the full
models, and the preset's time shares are also given with the ViT time scaled to its 23 blocks.

Peak memory on CPU is the process's peak resident set (``ru_maxrss``, weights included) and its rise
over the resident set just before the measured call; configurations run from the least to the most
memory-hungry so the monotonic ``ru_maxrss`` reads each one's own peak. On CUDA it is
``torch.cuda.max_memory_allocated``. Results: ``benchmarks/results/bench_encoder.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

import hrperc
from hrperc import HighResEncoder

RESULTS = Path(__file__).resolve().parent / "results"


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_round_robin(fns: dict, device, reps: int) -> tuple[dict, dict]:
    """Time every configuration ``reps`` times, interleaved (so drifting machine load hits all alike);
    memory from each one's first call, in the given (least to most memory) order. Returns rows, outputs."""
    rows = {k: {"all_seconds": []} for k in fns}
    outputs = {}
    for rep in range(reps):
        for key, fn in fns.items():
            if rep == 0:
                if device.type == "cuda":
                    fn()  # warm up kernels and the allocator first
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device) / 2**20
                else:
                    before = _rss_mib()
            _sync(device)
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
            rows[key]["all_seconds"].append(time.perf_counter() - t0)
            if rep == 0:
                peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _peak_mib()
                rows[key].update(peak_mib=peak, rise_mib=peak - before)
                outputs[key] = out
    for r in rows.values():
        r["seconds"] = statistics.median(r["all_seconds"])
    return rows, outputs


def _timm_kwargs(depth: int | None) -> dict:
    return {} if depth is None else {"depth": depth}


def bench_batching(name: str, model_name: str, device, reps: int, chunks, depth: int | None) -> dict:
    backbone = hrperc.create_encoder(f"timm:{model_name}", **_timm_kwargs(depth)).to(device)
    enc = HighResEncoder.inf_llava(backbone, dem=hrperc.DualPerspectiveEnhancement(backbone.hidden_size, heads=8))
    enc = enc.to(device)
    h, w = backbone.image_size
    torch.manual_seed(0)
    crops = enc.crop(torch.rand(1, 3, 3 * h, 3 * w, device=device))
    subimages = torch.cat([crops.local, crops.strided, crops.thumbnail])  # 2N+1 = 19
    S = subimages.shape[0]
    default = enc.chunk_size  # what max_batch="auto" picks on this device

    def serial():
        return torch.cat([enc.backbone.features(enc.backbone.normalize(subimages[i : i + 1])) for i in range(S)])

    def batched(mb):
        def run():
            enc.max_batch = mb
            return enc.encode_subimages(subimages)

        return run

    fns = {"serial": serial}
    for mb in sorted({default, *chunks}):  # least to most memory
        fns[f"auto={mb}" if mb == default else f"max_batch={mb}"] = batched(mb)
    with torch.inference_mode():
        enc.backbone.features(enc.backbone.normalize(subimages[:1]))  # warm-up (lazy init, allocator)
        rows, outputs = measure_round_robin(fns, device, reps)
    enc.max_batch = "auto"
    for key, got in outputs.items():
        torch.testing.assert_close(got, outputs["serial"], rtol=1e-4, atol=1e-4, msg=f"{key} differs from serial")
    for r in rows.values():
        r["speed_vs_serial"] = rows["serial"]["seconds"] / r["seconds"]
        r["memory_vs_serial"] = r["peak_mib"] / rows["serial"]["peak_mib"]
        r["rise_vs_serial"] = r["rise_mib"] / max(rows["serial"]["rise_mib"], 1e-9)
    out = {"model": model_name, "depth": backbone.num_layers, "subimages": S,
           "tokens_per_subimage": backbone.num_patches + backbone.num_prefix_tokens,
           "default_max_batch": default, "rows": rows}  # fmt: skip
    print(f"\n{name} ({model_name}, {backbone.num_layers} blocks), {S} sub-images, auto max_batch={default}")
    print(f"  {'config':<14} {'ms':>9} {'x serial':>9} {'peak MiB':>9} {'x serial':>9} {'rise MiB':>9}")
    for key, r in rows.items():
        print(
            f"  {key:<14} {r['seconds'] * 1e3:9.1f} {r['speed_vs_serial']:9.2f} {r['peak_mib']:9.0f} "
            f"{r['memory_vs_serial']:9.2f} {r['rise_mib']:9.0f}"
        )
    return out


def bench_preset(device, reps: int, depth: int | None) -> dict:
    backbone = hrperc.create_encoder("timm:vit_large_patch14_clip_336", **_timm_kwargs(depth)).to(device)
    torch.manual_seed(0)
    dem = hrperc.DualPerspectiveEnhancement(backbone.hidden_size, heads=8).to(device)
    skip = HighResEncoder.inf_llava(backbone, dem=dem)
    full = HighResEncoder.inf_llava(backbone, dem=dem, encode_all=True)
    image = torch.rand(1, 3, 1008, 1008, device=device)
    fns = {"skipping (11 passes)": lambda: skip(image, timings=True),
           "encode_all (19 passes)": lambda: full(image, timings=True)}  # fmt: skip
    with torch.inference_mode():
        skip(image)  # warm-up
        rows, outputs = measure_round_robin(fns, device, reps)
    a, b = outputs.values()
    max_diff = (a.tokens - b.tokens).abs().max().item()
    blocks_run = backbone.num_layers + 1 + skip.layer  # layer -2 stops after L-1 blocks
    shares = {}
    for label, out in (("skipping", a), ("encode_all", b)):
        sec = dict(out.timings)  # stage times of the first measured call
        total = sum(sec.values())
        entry = {"seconds": sec, "vit": sec["backbone"] / total, "dem": sec["dem"] / total,
                 "rest": (total - sec["backbone"] - sec["dem"]) / total}  # fmt: skip
        if backbone.num_layers != 24:  # truncated ViT-L: scale the ViT time to the 23 blocks layer -2 runs
            vit_full = sec["backbone"] * 23 / blocks_run
            total_full = total - sec["backbone"] + vit_full
            entry["extrapolated_24_blocks"] = {
                "vit": vit_full / total_full, "dem": sec["dem"] / total_full,
                "rest": (total - sec["backbone"] - sec["dem"]) / total_full, "seconds": total_full,
            }  # fmt: skip
        shares[label] = entry
    speedup = rows["encode_all (19 passes)"]["seconds"] / rows["skipping (11 passes)"]["seconds"]
    speedup_24 = None
    if "extrapolated_24_blocks" in shares["skipping"]:
        speedup_24 = (
            shares["encode_all"]["extrapolated_24_blocks"]["seconds"]
            / shares["skipping"]["extrapolated_24_blocks"]["seconds"]
        )
    print(
        f"\nreleased preset, 1008x1008 -> {tuple(a.tokens.shape)} tokens, ViT-L/14-336 random weights "
        f"({backbone.num_layers} blocks)"
    )
    for key, r in rows.items():
        print(f"  {key:<24} {r['seconds'] * 1e3:9.1f} ms  peak {r['peak_mib']:7.0f} MiB")
    print(f"  speed-up from skipping: {speedup:.2f}x; max |difference| of the 576 tokens: {max_diff:.3g}")
    if speedup_24 is not None:
        print(f"  speed-up with the ViT time scaled to 24 blocks: {speedup_24:.2f}x")
    for label, s in shares.items():
        vit, dem_, rest = (100 * s[k] for k in ("vit", "dem", "rest"))
        print(f"  {label:<10} time share: ViT {vit:.1f}%, DEM {dem_:.1f}%, rest {rest:.1f}% (measured)")
        if "extrapolated_24_blocks" in s:
            e = s["extrapolated_24_blocks"]
            print(
                f"  {'':<10} at 24 blocks:  ViT {100 * e['vit']:.1f}%, DEM {100 * e['dem']:.1f}%, "
                f"rest {100 * e['rest']:.1f}% (ViT time scaled per block)"
            )
    return {"tokens": list(a.tokens.shape), "depth": backbone.num_layers, "rows": rows, "speedup_skipping": speedup,
            "speedup_skipping_24_blocks": speedup_24, "max_abs_diff": max_diff, "shares": shares,
            "passes": {"skipping": a.encoded, "encode_all": b.encoded}}  # fmt: skip


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["batching"]
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(5 * (len(models) + 1), 4), dpi=110)
    for ax, (name, res) in zip(axes, models.items()):
        keys = list(res["rows"])
        speed = [res["rows"][k]["speed_vs_serial"] for k in keys]
        mem = [res["rows"][k]["memory_vs_serial"] for k in keys]
        x = range(len(keys))
        ax.bar([i - 0.2 for i in x], speed, 0.4, label="speed vs serial")
        ax.bar([i + 0.2 for i in x], mem, 0.4, label="peak memory vs serial")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(x), keys, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{name}: {res['subimages']} sub-images", fontsize=10)
        ax.legend(fontsize=8)
    ax = axes[-1]
    shares = results["preset"]["shares"]
    labels = list(shares)
    bottom = [0.0] * len(labels)
    def part_seconds(sec: dict, part: str) -> float:
        if part == "vit":
            return sec["backbone"]
        if part == "dem":
            return sec["dem"]
        return sum(sec.values()) - sec["backbone"] - sec["dem"]

    for part in ("vit", "dem", "rest"):
        secs = [part_seconds(shares[lab]["seconds"], part) for lab in labels]
        ax.bar(labels, secs, bottom=bottom, label=part)
        bottom = [b + s for b, s in zip(bottom, secs)]
    ax.set_ylabel("seconds")
    ax.set_title(f"released preset, 1008 px -> 576 tokens ({results['preset']['speedup_skipping']:.2f}x)", fontsize=10)
    ax.legend(fontsize=8)
    depth = f"ViTs cut to {results['depth']} blocks" if results["depth"] else "full-depth ViTs"
    fig.suptitle(f"HighResEncoder on {results['device_name']} ({depth}; random weights)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=None, help="timed calls per configuration (CPU 2, GPU 10)")
    p.add_argument(
        "--depth", type=int, default=None,
        help="transformer blocks of both ViTs (default: all on GPU, 3 on CPU, where a full ViT-L pass takes "
        "many seconds; per-block cost and batching ratios do not depend on depth)",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="ViT-B only, one repetition (a smoke run)")
    p.add_argument("--preset-only", action="store_true", help="only the released preset (e.g. with --depth 24)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    reps = 1 if args.quick else (args.reps or (2 if cpu else 10))
    depth = args.depth if args.depth is not None else (3 if cpu else None)
    name = torch.cuda.get_device_name(device) if not cpu else f"{platform.processor() or 'CPU'}"
    results = {
        "device": str(device),
        "device_name": f"{name}, {torch.get_num_threads()} threads" if cpu else name,
        "torch": torch.__version__,
        "depth": depth,
        "reps": reps,
        "batching": {},
    }
    print(f"device {results['device_name']}; ViT depth {depth or 'full'}; {reps} timed call(s) per configuration")
    if args.preset_only:
        results["preset"] = bench_preset(device, reps, depth)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"bench_encoder_preset_depth{depth or 'full'}.json"
        path.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {path}")
        return 0
    results["batching"]["ViT-B/16"] = bench_batching("ViT-B/16", "vit_base_patch16_224", device, reps, (19,), depth)
    if not args.quick:
        results["batching"]["ViT-L/14-336"] = bench_batching(
            "ViT-L/14-336", "vit_large_patch14_clip_336", device, reps, (19,), depth
        )
        results["preset"] = bench_preset(device, reps, depth)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (out / f"bench_encoder{suffix}.json").write_text(json.dumps(results, indent=2))
    if not args.quick:
        plot(results, out / "bench_encoder.png")
    print(f"\nwrote {out / f'bench_encoder{suffix}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
