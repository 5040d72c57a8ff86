"""Recipes vs transformers: the whole front end, image in -> tokens out, time and peak memory.

Run (keep the machine quiet)::

    flock /tmp/hrperc-bench.lock .venv/bin/python benchmarks/bench_recipes.py [--quick]

For ``llava_next`` (CLIP 336/14), ``llava_onevision`` (SigLIP 384/14) and ``internvl`` (InternViT 448/14):
the same random transformers model (full image and tile size, tiny width ``--width`` and ``--depth``
blocks, so that pre- and post-processing weigh as they do in a real model's front end relative to a
cheap ViT), two paths that produce the same tokens:

* **transformers**: the model's default image processor (``LlavaNextImageProcessor``, ... : the
  torchvision backend) on the uint8 images, then ``model.get_image_features(...)`` (ViT, projector,
  unpad / newline / shrink or pixel shuffle);
* **hrperc**: ``create_encoder(recipe, model.vision_tower)(images, project=projector, newline=...)``.

``--inf-llava``: instead, the ``inf_llava`` front end in fp32 and bf16 (ViT-L/14-336 cut to 6 blocks, one
1008 px image), the path ``docs/encoder.md`` documents.

Rows: one image (1000 x 800) and a ragged batch of 8 images of different sizes; fp32, and bf16 (both
models moved with ``.to(torch.bfloat16)``; the processor's float32 pixels are cast for transformers).
Time: the median of ``--reps`` interleaved calls; hrperc's split (views = resize/pad/crop, backbone,
assemble) from ``forward(timings=True)``, transformers' split (processor, model). Peak memory: each
row in a fresh subprocess, the peak resident set during one call over the resident set before it
(VmHWM after ``clear_refs``), as in ``bench_encoder.py``, the median of 3 such processes (one process's
peak moves by tens of MiB with the allocator's state). The tokens of both paths are compared in
every row (max abs difference reported). Results: ``benchmarks/results/bench_recipes.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encoder import measure_memory_here  # noqa: E402

import hrperc  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RECIPES = ("llava_next", "llava_onevision", "internvl")
SINGLE = [(1000, 800)]
MEMORY_RUNS = 3
RAGGED = [(1000, 800), (480, 640), (1200, 300), (333, 500), (2000, 1500), (200, 150), (768, 1024), (900, 900)]


def build(recipe: str, width: int, depth: int, seed: int = 0):
    """``(model, processor)`` of a random transformers model for ``recipe`` (tiny text model)."""
    import transformers as tf

    torch.manual_seed(seed)
    vis = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth, num_attention_heads=4)
    text = tf.Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    if recipe == "llava_next":
        cfg = tf.LlavaNextConfig(
            vision_config=tf.CLIPVisionConfig(image_size=336, patch_size=14, **vis),
            text_config=text,
            image_token_id=255,
        )
        model = tf.LlavaNextForConditionalGeneration(cfg)
        proc = tf.LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    elif recipe == "llava_onevision":
        cfg = tf.LlavaOnevisionConfig(
            vision_config=tf.SiglipVisionConfig(image_size=384, patch_size=14, **vis),
            text_config=text,
            image_token_id=255,
        )
        model = tf.LlavaOnevisionForConditionalGeneration(cfg)
        proc = tf.LlavaOnevisionImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    else:
        vcfg = tf.InternVLVisionConfig(image_size=448, patch_size=14, **vis)
        cfg = tf.InternVLConfig(vision_config=vcfg, text_config=text, image_token_id=255)
        model = tf.InternVLForConditionalGeneration(cfg)
        proc = tf.GotOcr2ImageProcessor(
            crop_to_patches=True,
            size={"height": 448, "width": 448},
            max_patches=12,
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        )
    return model.eval(), proc


def paths(recipe: str, model, proc, dtype):
    """``(transformers_fn, hrperc_fn)``: images -> list of per-image token tensors (+ timings dict)."""
    inner = model.model
    model.to(dtype)
    enc = hrperc.create_encoder(recipe, inner.vision_tower, max_batch="auto").to(dtype)
    projector = inner.multi_modal_projector
    newline = getattr(inner, "image_newline", None)

    @torch.inference_mode()
    def run_transformers(images, times):
        t0 = time.perf_counter()
        batch = proc(images=images, return_tensors="pt")
        t1 = time.perf_counter()
        pixels = batch["pixel_values"].to(dtype)
        if recipe == "internvl":
            feats = inner.get_image_features(
                pixel_values=pixels, vision_feature_layer=-1, vision_feature_select_strategy="default"
            ).pooler_output
            out = list(feats.split(batch["num_patches"].tolist() if "num_patches" in batch else [len(feats)]))
            out = [f.flatten(0, 1) for f in out]
        else:
            out = list(inner.get_image_features(pixel_values=pixels, image_sizes=batch["image_sizes"]).pooler_output)
        t2 = time.perf_counter()
        times["processor"] = times.get("processor", 0.0) + t1 - t0
        times["model"] = times.get("model", 0.0) + t2 - t1
        return out

    @torch.inference_mode()
    def run_hrperc(images, times):
        out = enc(images, project=projector, newline=newline, timings=True)
        for k, v in out.timings.items():
            times[k] = times.get(k, 0.0) + v
        return [out.tokens[b, :n] for b, n in enumerate(out.num_tokens)]

    return run_transformers, run_hrperc


def images_of(sizes, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]


def worker(spec: dict) -> dict:
    model, proc = build(spec["recipe"], spec["width"], spec["depth"])
    dtype = getattr(torch, spec["dtype"])
    fns = dict(zip(("transformers", "hrperc"), paths(spec["recipe"], model, proc, dtype)))
    images = images_of(SINGLE if spec["rows"] == "single" else RAGGED)
    fn = fns[spec["path"]]
    fn(images_of([(64, 64)]), {})  # warm-up with a small image
    return measure_memory_here(lambda: fn(images, {}), torch.device("cpu"))


def bench_row(recipe, rows, dtype_name, width, depth, reps, model, proc) -> dict:
    dtype = getattr(torch, dtype_name)
    run_t, run_h = paths(recipe, model, proc, dtype)
    images = images_of(SINGLE if rows == "single" else RAGGED)
    run_t(images_of([(64, 64)]), {}), run_h(images_of([(64, 64)]), {})
    secs = {"transformers": [], "hrperc": []}
    split = {"transformers": {}, "hrperc": {}}
    for _ in range(reps):  # interleaved
        for name, fn in (("transformers", run_t), ("hrperc", run_h)):
            t0 = time.perf_counter()
            out = fn(images, split[name])
            secs[name].append(time.perf_counter() - t0)
            if name == "transformers":
                ref = out
            else:
                mine = out
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(ref, mine))
    same_len = all(a.shape == b.shape for a, b in zip(ref, mine))
    row = {
        "recipe": recipe,
        "rows": rows,
        "dtype": dtype_name,
        "images": len(images),
        "same_shapes": same_len,
        "max_abs_diff": diff,
        "tokens": [int(t.shape[0]) for t in mine],
    }
    for name in secs:
        row[f"{name}_seconds"] = statistics.median(secs[name])
        row[f"{name}_split"] = {k: v / reps for k, v in split[name].items()}
    row["speedup"] = row["transformers_seconds"] / row["hrperc_seconds"]
    for name in ("transformers", "hrperc"):
        spec = dict(recipe=recipe, rows=rows, dtype=dtype_name, width=width, depth=depth, path=name)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        runs = []
        for _ in range(MEMORY_RUNS):  # RSS peaks vary with the allocator's state: the median of fresh processes
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise RuntimeError(f"memory worker {spec} failed:\n{res.stderr[-3000:]}")
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        runs.sort(key=lambda r: r["rise_mib"])
        row[f"{name}_memory"] = {**runs[len(runs) // 2], "all_rise_mib": [r["rise_mib"] for r in runs]}
    row["memory_ratio"] = row["hrperc_memory"]["rise_mib"] / max(row["transformers_memory"]["rise_mib"], 1e-9)
    return row


def bench_inf_llava_dtypes(depth: int, reps: int) -> dict:
    """The ``inf_llava`` front end in fp32 and in bf16 (``enc.to(torch.bfloat16)``), one 1008 px uint8 image,
    ViT-L/14-336 (timm, random weights) cut to ``depth`` blocks; ``encode_all`` fp32 (all 19 sub-images,
    as the released code encodes them) for reference. Tokens of bf16 vs fp32: max abs difference."""
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_large_patch14_clip_quickgelu_336", pretrained=False, depth=depth, num_classes=0)
    fp32 = hrperc.create_encoder("inf_llava", vit)
    bf16 = hrperc.create_encoder("inf_llava", vit, dem=fp32.dem)  # the same weights ...
    bf16 = copy_to(bf16, torch.bfloat16)  # ... moved to bf16 (a copy: fp32 keeps its weights)
    every = hrperc.create_encoder("inf_llava", vit, dem=fp32.dem, encode_all=True)
    image = images_of([(1008, 1008)])[0]
    fns = {"fp32 (11 passes)": fp32, "bf16 (11 passes)": bf16, "fp32 encode_all (19 passes)": every}
    secs = {k: [] for k in fns}
    outs = {}
    with torch.inference_mode():
        for enc in fns.values():
            enc(image)  # warm-up
        for _ in range(reps):
            for k, enc in fns.items():
                t0 = time.perf_counter()
                outs[k] = enc(image).tokens
                secs[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in secs.items()}
    diff = (outs["bf16 (11 passes)"].float() - outs["fp32 (11 passes)"]).abs().max().item()
    scale = outs["fp32 (11 passes)"].abs().max().item()
    return {
        "depth": depth,
        "seconds": med,
        "bf16_vs_fp32": med["fp32 (11 passes)"] / med["bf16 (11 passes)"],
        "bf16_vs_encode_all_fp32": med["fp32 encode_all (19 passes)"] / med["bf16 (11 passes)"],
        "max_abs_diff": diff,
        "max_abs_fp32": scale,
    }


def copy_to(enc, dtype):
    import copy

    return copy.deepcopy(enc).to(dtype)


def describe(row: dict) -> str:
    """Two lines for one row: times, speed and memory ratios, token agreement; where the time goes."""
    t_mem, h_mem = row["transformers_memory"]["rise_mib"], row["hrperc_memory"]["rise_mib"]
    head = (
        f"{row['recipe']:16s} {row['rows']:6s} {row['dtype']:8s} "
        f"transformers {row['transformers_seconds'] * 1e3:8.1f} ms"
        f"  hrperc {row['hrperc_seconds'] * 1e3:8.1f} ms  speed x{row['speedup']:.2f}  memory rise {t_mem:7.1f} -> "
        f"{h_mem:7.1f} MiB (x{row['memory_ratio']:.2f})  max|diff| {row['max_abs_diff']:.2e}"
    )
    ms = {name: {k: round(v * 1e3, 1) for k, v in row[f"{name}_split"].items()} for name in ("hrperc", "transformers")}
    return f"{head}\n    split (ms): hrperc {ms['hrperc']}; transformers {ms['transformers']}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 rep, fp32 only, one recipe")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES))
    ap.add_argument("--inf-llava", action="store_true", help="only the inf_llava fp32-vs-bf16 rows (ViT-L/14-336)")
    ap.add_argument("--inf-llava-depth", type=int, default=6)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.inf_llava:
        res = bench_inf_llava_dtypes(args.inf_llava_depth, args.reps)
        print(json.dumps(res, indent=1))
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "bench_recipes_inf_llava_bf16.json").write_text(json.dumps(res, indent=1))
        return 0
    torch.manual_seed(0)
    reps, dtypes, recipes = args.reps, ("float32", "bfloat16"), args.recipes
    if args.quick:
        reps, dtypes, recipes = 1, ("float32",), recipes[:1]
    rows = []
    for recipe in recipes:
        for dtype_name in dtypes:
            model, proc = build(recipe, args.width, args.depth)
            for kind in ("single", "ragged"):
                row = bench_row(recipe, kind, dtype_name, args.width, args.depth, reps, model, proc)
                rows.append(row)
                print(describe(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "width": args.width,
        "depth": args.depth,
        "reps": reps,
    }
    if not args.quick:
        (RESULTS / "bench_recipes.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
