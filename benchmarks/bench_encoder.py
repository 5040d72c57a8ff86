"""HighResEncoder benchmark: batched vs serial ViT passes, footprint skipping, where front-end time goes.

Run (keep the machine quiet; other engineers' benchmarks share the lock)::

    flock /tmp/hrperc-bench.lock .venv/bin/python benchmarks/bench_encoder.py [--quick]

1. The same 2N+1 = 19 sub-images (3x3 grid + thumbnail) through ViT-B/16 (224) and ViT-L/14-336, random
   weights via timm: 19 serial single-image passes vs ``HighResEncoder.encode_subimages`` at the default
   ``max_batch="auto"`` chunking, at the previous default (4096 tokens per call) and at one 19-image call.
   Configurations that chunk the 19 sub-images the same way (e.g. ``max_batch=20`` and ``19``) are run once.
2. The released preset end to end, 1008x1008 pixels -> 576 tokens (ViT-L/14-336): footprint skipping
   (11 ViT passes) vs ``encode_all=True`` (19), identical output checked; and the share of front-end
   time spent in the ViT, the DEM and the rest (crop, gather, combine).

On a CPU both ViTs are cut to ``--depth 3`` blocks by default (a full ViT-L/14-336 pass takes many
seconds there); width, tokens, per-block cost and hence the batching ratios are those of the full
models, and the preset's time shares are also given with the ViT time scaled to its 23 blocks.

Time: median of ``--reps`` calls per configuration, interleaved in this process (so drifting machine
load hits all configurations alike), after a warm-up.

Peak memory: each configuration in a FRESH subprocess (``--worker``), so no configuration inherits
another's peak or allocator state. The worker builds the same model and inputs, warms the backbone up
with one single-image pass, reads its baseline, then runs the configuration once. On CPU the kernel's
peak-RSS counter is reset (``/proc/self/clear_refs`` <- 5) right before the call, and the row reports
``peak_mib`` (the whole process's peak resident set during the call: weights, inputs, Python/torch
included), ``rise_mib`` (that peak minus the resident set just before the call: what the call itself
costs) and ``baseline_mib``; where the counter cannot be reset, ``ru_maxrss`` is used and
``peak_method`` says so. On CUDA: ``torch.cuda.max_memory_allocated`` after a warm-up call and
``reset_peak_memory_stats``, rise over ``memory_allocated`` before the call.
Results: ``benchmarks/results/bench_encoder.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import hrperc

RESULTS = Path(__file__).resolve().parent / "results"
PRESET_LABELS = ("skipping (11 passes)", "encode_all (19 passes)")


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS, Linux >= 4.0
        return True
    except OSError:
        return False


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_times(fns: dict, device, reps: int) -> tuple[dict, dict]:
    """Time every configuration ``reps`` times, interleaved (so drifting machine load hits all alike).
    Returns rows (``all_seconds``, median ``seconds``) and each configuration's first output."""
    rows = {k: {"all_seconds": []} for k in fns}
    outputs = {}
    for rep in range(reps):
        for key, fn in fns.items():
            if rep == 0 and device.type == "cuda":
                fn()  # warm up kernels and the allocator first
            _sync(device)
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
            rows[key]["all_seconds"].append(time.perf_counter() - t0)
            if rep == 0:
                outputs[key] = out
    for r in rows.values():
        r["seconds"] = statistics.median(r["all_seconds"])
    return rows, outputs


def measure_memory_here(fn, device) -> dict:
    """One call of ``fn`` in this (fresh) process: peak and rise over the baseline just before it."""
    if device.type == "cuda":
        fn()  # warm-up: kernels, cuBLAS workspaces, allocator
        _sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
        fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        return {
            "peak_mib": peak,
            "rise_mib": peak - before,
            "baseline_mib": before,
            "peak_method": "torch.cuda.max_memory_allocated",
        }
    resettable = _reset_peak()
    before = _status_mib("VmRSS")
    fn()
    if resettable:
        peak, method = _status_mib("VmHWM"), "VmHWM after clear_refs=5 (peak RSS during the call)"
    else:  # process-lifetime peak: includes model construction, so it can only over-state the call's peak
        peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ru_maxrss (process lifetime)"
    return {
        "peak_mib": peak,
        "rise_mib": max(peak - before, 0.0),
        "baseline_mib": before,
        "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_method": method,
    }


def measure_memory(spec: dict) -> dict:
    """Run one configuration in a fresh subprocess (``--worker``) and return its memory row."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"memory worker {spec} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _timm_kwargs(depth: int | None) -> dict:
    return {} if depth is None else {"depth": depth}


def _setup_batching(model_name: str, depth: int | None, device):
    backbone = hrperc.create_backbone(f"timm:{model_name}", **_timm_kwargs(depth)).to(device)
    dem = hrperc.DualPerspectiveEnhancement(backbone.hidden_size, heads=8)
    enc = hrperc.create_encoder("inf_llava", backbone, dem=dem)
    enc = enc.to(device)
    h, w = backbone.image_size
    torch.manual_seed(0)
    crops = enc.crop(torch.rand(1, 3, 3 * h, 3 * w, device=device))
    subimages = torch.cat([crops.local, crops.strided, crops.thumbnail])  # 2N+1 = 19
    return enc, subimages


def _batching_fn(enc, subimages, max_batch):
    """``max_batch=None``: 2N+1 serial single-image passes; else ``encode_subimages`` in such chunks."""
    if max_batch is None:
        return lambda: torch.cat(
            [enc.backbone.features(enc.backbone.normalize(subimages[i : i + 1])) for i in range(len(subimages))]
        )

    def run():
        enc.max_batch = max_batch
        return enc.encode_subimages(subimages)

    return run


def batching_configs(enc, S: int, chunks) -> dict:
    """``{label: max_batch}`` (``None`` = serial); one entry per distinct chunking of the S sub-images."""
    per_tile = enc.backbone.num_patches + enc.backbone.num_prefix_tokens
    default = enc.chunk_size  # what max_batch="auto" picks on this device
    old_default = max(1, 4096 // per_tile) if enc.backbone.device.type == "cpu" else None
    configs, seen = {"serial": None}, {1}  # serial == chunks of one sub-image
    candidates = [(default, f"auto={default}")]
    if old_default is not None:
        candidates.append((old_default, f"max_batch={old_default} (4096 tok)"))
    candidates += [(mb, f"max_batch={mb}") for mb in chunks]
    for mb, label in sorted(candidates, key=lambda c: min(c[0], S)):  # least to most memory
        effective = min(mb, S)  # max_batch=20 and 19 both mean one call for 19 sub-images
        if effective in seen:
            continue
        seen.add(effective)
        configs[label] = mb
    return configs


def bench_batching(name: str, model_name: str, device, reps: int, chunks, depth: int | None) -> dict:
    enc, subimages = _setup_batching(model_name, depth, device)
    backbone = enc.backbone
    S = subimages.shape[0]
    default = enc.chunk_size
    configs = batching_configs(enc, S, chunks)
    fns = {label: _batching_fn(enc, subimages, mb) for label, mb in configs.items()}
    with torch.inference_mode():
        enc.backbone.features(enc.backbone.normalize(subimages[:1]))  # warm-up (lazy init, allocator)
        rows, outputs = measure_times(fns, device, reps)
    enc.max_batch = "auto"
    for key, got in outputs.items():
        torch.testing.assert_close(got, outputs["serial"], rtol=1e-4, atol=1e-4, msg=f"{key} differs from serial")
    for label, mb in configs.items():
        spec = {"kind": "batching", "model": model_name, "depth": depth, "device": str(device), "max_batch": mb}
        rows[label].update(measure_memory(spec))
    for r in rows.values():
        r["speed_vs_serial"] = rows["serial"]["seconds"] / r["seconds"]
        r["memory_vs_serial"] = r["peak_mib"] / rows["serial"]["peak_mib"]
        r["rise_vs_serial"] = r["rise_mib"] / max(rows["serial"]["rise_mib"], 1e-9)
    out = {
        "model": model_name,
        "depth": backbone.num_layers,
        "subimages": S,
        "tokens_per_subimage": backbone.num_patches + backbone.num_prefix_tokens,
        "default_max_batch": default,
        "configs": configs,
        "rows": rows,
    }
    print(f"\n{name} ({model_name}, {backbone.num_layers} blocks), {S} sub-images, auto max_batch={default}")
    print(f"  {'config':<24} {'ms':>9} {'x serial':>9} {'peak MiB':>9} {'x serial':>9} {'rise MiB':>9} {'x serial':>9}")
    for key, r in rows.items():
        print(
            f"  {key:<24} {r['seconds'] * 1e3:9.1f} {r['speed_vs_serial']:9.2f} {r['peak_mib']:9.0f} "
            f"{r['memory_vs_serial']:9.2f} {r['rise_mib']:9.0f} {r['rise_vs_serial']:9.2f}"
        )
    return out


def _setup_preset(depth: int | None, device):
    backbone = hrperc.create_backbone("timm:vit_large_patch14_clip_336", **_timm_kwargs(depth)).to(device)
    torch.manual_seed(0)
    dem = hrperc.DualPerspectiveEnhancement(backbone.hidden_size, heads=8).to(device)
    skip = hrperc.create_encoder("inf_llava", backbone, dem=dem)
    full = hrperc.create_encoder("inf_llava", backbone, dem=dem, encode_all=True)
    image = torch.rand(1, 3, 1008, 1008, device=device)
    fns = {PRESET_LABELS[0]: lambda: skip(image, timings=True), PRESET_LABELS[1]: lambda: full(image, timings=True)}
    return backbone, skip, full, image, fns


def worker(spec: dict) -> dict:
    """One configuration's memory in this fresh process (see module docs)."""
    device = torch.device(spec["device"])
    with torch.inference_mode():
        if spec["kind"] == "batching":
            enc, subimages = _setup_batching(spec["model"], spec["depth"], device)
            fn = _batching_fn(enc, subimages, spec["max_batch"])
            enc.backbone.features(enc.backbone.normalize(subimages[:1]))  # the same warm-up as the timing run
        else:
            _, skip, _, image, fns = _setup_preset(spec["depth"], device)
            fn = fns[spec["label"]]
            skip.backbone.features(skip.backbone.normalize(torch.rand(1, 3, *skip.backbone.image_size, device=device)))
        return measure_memory_here(fn, device)


def bench_preset(device, reps: int, depth: int | None) -> dict:
    backbone, skip, full, image, fns = _setup_preset(depth, device)
    with torch.inference_mode():
        skip(image)  # warm-up
        rows, outputs = measure_times(fns, device, reps)
    for label in PRESET_LABELS:
        rows[label].update(measure_memory({"kind": "preset", "depth": depth, "device": str(device), "label": label}))
    a, b = outputs.values()
    max_diff = (a.tokens - b.tokens).abs().max().item()
    blocks_run = backbone.num_layers + 1 + skip.layer  # layer -2 stops after L-1 blocks
    shares = {}
    for label, out in (("skipping", a), ("encode_all", b)):
        sec = dict(out.timings)  # stage times of the first measured call
        if "assemble" in sec:  # the one runner: the DEM (and the combine) run in the front end's assemble stage
            sec["dem"] = sec.pop("assemble")
        total = sum(sec.values())
        entry = {
            "seconds": sec,
            "vit": sec["backbone"] / total,
            "dem": sec["dem"] / total,
            "rest": (total - sec["backbone"] - sec["dem"]) / total,
        }
        if backbone.num_layers != 24:  # truncated ViT-L: scale the ViT time to the 23 blocks layer -2 runs
            vit_full = sec["backbone"] * 23 / blocks_run
            total_full = total - sec["backbone"] + vit_full
            entry["extrapolated_24_blocks"] = {
                "vit": vit_full / total_full,
                "dem": sec["dem"] / total_full,
                "rest": (total - sec["backbone"] - sec["dem"]) / total_full,
                "seconds": total_full,
            }
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
        print(f"  {key:<24} {r['seconds'] * 1e3:9.1f} ms  peak {r['peak_mib']:7.0f} MiB, rise {r['rise_mib']:7.0f} MiB")
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
    return {
        "tokens": list(a.tokens.shape),
        "depth": backbone.num_layers,
        "rows": rows,
        "speedup_skipping": speedup,
        "speedup_skipping_24_blocks": speedup_24,
        "max_abs_diff": max_diff,
        "shares": shares,
        "passes": {"skipping": a.encoded, "encode_all": b.encoded},
    }


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
        "--depth",
        type=int,
        default=None,
        help="transformer blocks of both ViTs (default: all on GPU, 3 on CPU, where a full ViT-L pass takes "
        "many seconds; per-block cost and batching ratios do not depend on depth)",
    )
    p.add_argument("--quick", action="store_true", help="ViT-B only, one repetition (a smoke run)")
    p.add_argument("--preset-only", action="store_true", help="only the released preset (e.g. with --depth 24)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # JSON spec: one memory measurement
    args = p.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
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
        "memory_method": "each configuration in a fresh subprocess; CPU: peak RSS during the call (VmHWM after "
        "clear_refs=5; weights included) and its rise over the RSS just before the call; CUDA: "
        "max_memory_allocated and its rise over memory_allocated before the call",
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
