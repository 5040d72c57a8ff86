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

Native-resolution rows (after the others; ``--native-only``: alone), the path ``docs/recipes.md`` ("Speed
and memory") documents: ``qwen2_5_vl`` and ``pixtral`` on towers of the real width (Qwen2.5-VL's 1280,
Pixtral's 1024) cut to ``--native-depth`` blocks, a ragged batch of 8 uint8 images with sides in
[300, 2000] px (seeded), within the budgets ``--native-max-pixels`` (Qwen) and ``--native-longest-edge``
(Pixtral): (a) the whole front end, processor + ``get_image_features`` against ``create_encoder(...)(images)``,
fp32 and bf16; (b) preprocessing alone (the processor call against hrperc's forward stopped at the tower's
first module), 8 and 32 images, as uint8 tensors and as PIL images; (c) fp32 with 32 images, to show memory
growing with the patches. Wall-clock and process CPU seconds (the latter steadier on a busy machine). Same
method as below (``--native-reps`` interleaved calls, memory in fresh processes). Results:
``benchmarks/results/bench_recipes_native.json``.

``--tiling-new``: only the rows of ``idefics3``, ``smolvlm``, ``minicpm_v`` and ``gemma3`` (towers of the real
width cut to ``--native-depth`` blocks, the native rows' ragged batch of 8, fp32, the budgets of
``TILING_NEW_BUDGET``); results: ``benchmarks/results/bench_recipes_tiling_new.json``, rewritten after each row.

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


# --- native-resolution recipes (Qwen2.5-VL, Pixtral): towers of the real width, cut to a few blocks ---------
NATIVE = ("qwen2_5_vl", "pixtral")
NATIVE_SIDES = (300, 2000)  # each side of a ragged batch's images, uniform in this range (seeded)
NATIVE_MIN_PIXELS = 56 * 56  # Qwen's processor minimum (transformers' and the released checkpoints')
NATIVE_MAX_PIXELS = 28 * 28 * 32  # Qwen budget here: <= 32 tokens (128 patches) an image, see --native-max-pixels
NATIVE_LONGEST_EDGE = 192  # Pixtral budget here: <= 12 x 12 patches an image, see --native-longest-edge
NATIVE_OUT_HIDDEN = 3584  # Qwen2.5-VL-7B's merger output (the LLM's width)


class _TowerReached(Exception):
    """Raised by a pre-hook on the tower's first module: what ran before it is the preprocessing."""


def native_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` sizes ``(H, W)``, each side uniform in ``NATIVE_SIDES``; one stream, so the first 8 of 32 are the 8."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = NATIVE_SIDES
    return [(h, w) for h, w in torch.randint(lo, hi + 1, (n, 2), generator=g).tolist()]


def build_native(recipe: str, budget: dict, seed: int = 0):
    """``(model, processor, options)``: a random transformers model whose vision tower has the real width, cut
    to ``budget["depth"]`` blocks (tiny text model), its image processor (torchvision backend) and the
    ``create_encoder`` options of the same budget.

    ``qwen2_5_vl``: Qwen2.5-VL's tower (hidden 1280, 16 heads, MLP 3420, windows of 112 px, block 1 full
    attention, merger out ``budget["out_hidden"]``); ``pixtral``: Pixtral-12B's tower (hidden 1024, 16 heads of
    64, MLP 4096, silu, patch 16) in a ``LlavaForConditionalGeneration`` (``vision_feature_select_strategy=
    "full"``, tiny projector to the 64-wide text model).
    """
    import transformers as tf

    torch.manual_seed(seed)
    text = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=None,
        eos_token_id=None,
    )
    if recipe == "qwen2_5_vl":
        vision = dict(
            depth=budget["depth"],
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=budget["out_hidden"],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1],
        )
        rope = {"rope_type": "default", "mrope_section": [2, 3, 3]}
        ids = dict(image_token_id=255, video_token_id=254, vision_start_token_id=253, vision_end_token_id=252)
        cfg = tf.Qwen2_5_VLConfig(vision_config=vision, text_config={**text, "rope_parameters": rope}, **ids)
        model = tf.Qwen2_5_VLForConditionalGeneration(cfg)
        options = dict(min_pixels=NATIVE_MIN_PIXELS, max_pixels=budget["max_pixels"])
        proc = tf.Qwen2VLImageProcessor(**options)
    else:
        vision = tf.PixtralVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=budget["depth"],
            num_attention_heads=16,
            head_dim=64,
            patch_size=16,
            image_size=1024,
            hidden_act="silu",
        )
        cfg = tf.LlavaConfig(
            vision_config=vision,
            text_config=tf.MistralConfig(**text, head_dim=16),
            image_token_index=255,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            projector_hidden_act="gelu",
        )
        model = tf.LlavaForConditionalGeneration(cfg)
        options = dict(longest_edge=budget["longest_edge"])
        proc = tf.PixtralImageProcessor(
            size={"longest_edge": budget["longest_edge"]}, patch_size={"height": 16, "width": 16}
        )
    return model.eval(), proc, options


def native_paths(recipe: str, model, proc, options: dict, dtype):
    """``(transformers_fn, hrperc_fn, encoder)``: images -> per-image tokens at the model's image positions.

    transformers: ``processor(images)`` then ``model.model.get_image_features`` (Pixtral: tower + projector);
    hrperc: ``create_encoder(recipe, tower, **options)(images, project=...)`` (Pixtral: the ``[IMG]``
    positions of its tokens; the ``[IMG_BREAK]`` / ``[IMG_END]`` slots are the model's own embeddings)."""
    inner = model.model
    model.to(dtype)
    tower = inner.visual if recipe == "qwen2_5_vl" else inner.vision_tower
    project = inner.multi_modal_projector if recipe == "pixtral" else None
    enc = hrperc.create_encoder(recipe, tower, **options).to(dtype)

    @torch.inference_mode()
    def run_transformers(images, times):
        t0 = time.perf_counter()
        batch = proc(images=images, return_tensors="pt")
        t1 = time.perf_counter()
        pixels = batch["pixel_values"].to(dtype)
        if recipe == "qwen2_5_vl":
            out = inner.get_image_features(pixel_values=pixels, image_grid_thw=batch["image_grid_thw"])
        else:
            out = inner.get_image_features(pixel_values=pixels, image_sizes=batch["image_sizes"])
        t2 = time.perf_counter()
        times["processor"] = times.get("processor", 0.0) + t1 - t0
        times["model"] = times.get("model", 0.0) + t2 - t1
        return list(out.pooler_output)

    @torch.inference_mode()
    def run_hrperc(images, times):
        out = enc(images, project=project, timings=True)
        for k, v in out.timings.items():
            times[k] = times.get(k, 0.0) + v
        if recipe == "qwen2_5_vl":
            return [out.tokens[b, :n] for b, n in enumerate(out.num_tokens)]
        slots = out.slot_mask
        return [out.tokens[b, :n][~slots[b, :n]] for b, n in enumerate(out.num_tokens)]

    return run_transformers, run_hrperc, enc


def native_preprocess(recipe: str, proc, enc):
    """``(transformers_fn, hrperc_fn)``: images -> the tower's input, and nothing after it.

    transformers: the processor call (resize, rescale + normalize, Qwen's patch layout / Pixtral's padding to
    the batch's largest image). hrperc: the encoder's own forward up to the tower's first module (a pre-hook
    stops it there): pixels, plans, uint8 resize, normalization, Qwen's packing into the processor's layout.
    Both return ``(pixels, grid_thw)``: the processor's ``pixel_values`` (and Qwen's ``image_grid_thw``), the
    tower's input the hook saw (Qwen: ``pixel_values`` and ``grid_thw``; Pixtral: the first view stack)."""
    first = enc.backbone.qwen.tower if recipe == "qwen2_5_vl" else enc.backbone.model.patch_conv
    seen: list[torch.Tensor] = []

    def stop(module, args, kwargs):
        seen.extend((args[0], kwargs.get("grid_thw")))
        raise _TowerReached

    def run_transformers(images):
        batch = proc(images=images, return_tensors="pt")
        return batch["pixel_values"], batch.get("image_grid_thw")

    @torch.inference_mode()
    def run_hrperc(images):
        seen.clear()
        hook = first.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            enc(images)
        except _TowerReached:
            pass
        finally:
            hook.remove()
        return seen[0], seen[1]

    return run_transformers, run_hrperc


def native_worker(spec: dict) -> dict:
    """One memory measurement of one native path in this (fresh) process."""
    model, proc, options = build_native(spec["recipe"], spec["budget"])
    fns = native_paths(spec["recipe"], model, proc, options, getattr(torch, spec["dtype"]))
    fn = dict(zip(("transformers", "hrperc"), fns[:2]))[spec["path"]]
    images = images_of(native_sizes(spec["images"]))
    fn(images_of([(64, 64)]), {})  # warm-up with a small image
    return measure_memory_here(lambda: fn(images, {}), torch.device("cpu"))


def native_memory(spec: dict) -> dict:
    """The median (by rise) of ``MEMORY_RUNS`` fresh processes measuring ``spec``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps({**spec, "native": True})]
    runs = []
    for _ in range(MEMORY_RUNS):  # RSS peaks vary with the allocator's state: the median of fresh processes
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"memory worker {spec} failed:\n{res.stderr[-3000:]}")
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    runs.sort(key=lambda r: r["rise_mib"])
    return {**runs[len(runs) // 2], "all_rise_mib": [r["rise_mib"] for r in runs]}


def bench_native_row(recipe, dtype_name, n_images, reps, budget, model, proc, options) -> dict:
    """(a): the whole front end, both paths interleaved (median of ``reps``), then memory in fresh processes."""
    dtype = getattr(torch, dtype_name)
    run_t, run_h, enc = native_paths(recipe, model, proc, options, dtype)
    sizes = native_sizes(n_images)
    images = images_of(sizes)
    run_t(images_of([(64, 64)]), {}), run_h(images_of([(64, 64)]), {})
    secs = {"transformers": [], "hrperc": []}
    cpu: dict[str, list[float]] = {"transformers": [], "hrperc": []}
    split = {"transformers": {}, "hrperc": {}}
    for _ in range(reps):  # interleaved
        for name, fn in (("transformers", run_t), ("hrperc", run_h)):
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn(images, split[name])
            secs[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            if name == "transformers":
                ref = out
            else:
                mine = out
    same = len(ref) == len(mine) and all(a.shape == b.shape for a, b in zip(ref, mine))
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(ref, mine)) if same else float("nan")
    patches = [enc.plan(s).resized for s in sizes]
    p = 14 if recipe == "qwen2_5_vl" else 16
    row = {
        "recipe": recipe,
        "dtype": dtype_name,
        "images": n_images,
        "sizes": sizes,
        "resized": patches,
        "patches": sum((h // p) * (w // p) for h, w in patches),
        "tokens": [int(t.shape[0]) for t in mine],
        "same_shapes": same,
        "max_abs_diff": diff,
        "max_abs_ref": max(a.float().abs().max().item() for a in ref),
    }
    for name in secs:
        row[f"{name}_seconds"] = statistics.median(secs[name])
        row[f"{name}_all_seconds"] = secs[name]
        row[f"{name}_split"] = {k: v / reps for k, v in split[name].items()}
        row[f"{name}_cpu_seconds"] = statistics.median(cpu[name])
    row["speedup"] = row["transformers_seconds"] / row["hrperc_seconds"]
    row["cpu_speedup"] = row["transformers_cpu_seconds"] / row["hrperc_cpu_seconds"]
    for name in ("transformers", "hrperc"):
        spec = dict(recipe=recipe, dtype=dtype_name, images=n_images, budget=budget, path=name)
        row[f"{name}_memory"] = native_memory(spec)
    row["memory_ratio"] = row["hrperc_memory"]["rise_mib"] / max(row["transformers_memory"]["rise_mib"], 1e-9)
    return row


def pil_images_of(sizes):
    """The images of :func:`images_of` as PIL images (RGB, 8 bits): how decoded photos arrive."""
    from PIL import Image

    return [Image.fromarray(t.permute(1, 2, 0).numpy()) for t in images_of(sizes)]


def bench_native_preprocess(recipe, n_images, reps, proc, enc, pil: bool = False) -> dict:
    """(b): preprocessing alone, fp32 pixels, both paths interleaved (median of ``reps``); uint8 ``(3, H, W)``
    tensors, or (``pil=True``) the same pixels as PIL images. Wall and process CPU seconds."""
    run_t, run_h = native_preprocess(recipe, proc, enc)
    make = pil_images_of if pil else images_of
    images = make(native_sizes(n_images))
    run_t(make([(64, 64)])), run_h(make([(64, 64)]))
    secs: dict[str, list[float]] = {"transformers": [], "hrperc": []}
    cpu: dict[str, list[float]] = {"transformers": [], "hrperc": []}
    for _ in range(reps):  # interleaved
        for name, fn in (("transformers", run_t), ("hrperc", run_h)):
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn(images)
            secs[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            if name == "transformers":
                ref = out
            else:
                mine = out
    if recipe == "qwen2_5_vl":  # every image's rows of pixel_values (hrperc packs images grouped by size)
        equal = _same_blocks(ref, mine)
    else:  # the first view's stack (the first patch_conv call): image 0, inside the processor's padding
        h, w = mine[0].shape[-2:]
        equal = torch.equal(ref[0][0, :, :h, :w], mine[0][0])
    row = {"recipe": recipe, "images": n_images, "input": "PIL" if pil else "tensor", "pixels_equal": equal}
    for name in secs:
        row[f"{name}_seconds"] = statistics.median(secs[name])
        row[f"{name}_all_seconds"] = secs[name]
        row[f"{name}_cpu_seconds"] = statistics.median(cpu[name])
    row["speedup"] = row["transformers_seconds"] / row["hrperc_seconds"]
    row["cpu_speedup"] = row["transformers_cpu_seconds"] / row["hrperc_cpu_seconds"]
    return row


def _same_blocks(ref, mine) -> bool:
    """Whether two packed ``(pixel_values, grid_thw)`` hold the same per-image blocks, in any image order."""

    def blocks(pixels, thw):
        return list(pixels.split(thw.prod(1).tolist()))

    left = blocks(*mine)
    for block in blocks(*ref):
        match = next((i for i, b in enumerate(left) if b.shape == block.shape and torch.equal(b, block)), None)
        if match is None:
            return False
        left.pop(match)
    return not left


def describe_native(row: dict) -> str:
    """Two lines for one native row: times, speed and memory ratios, token agreement; where the time goes."""
    t_mem, h_mem = row["transformers_memory"]["rise_mib"], row["hrperc_memory"]["rise_mib"]
    head = (
        f"{row['recipe']:10s} {row['images']:2d} images ({row['patches']:5d} patches) {row['dtype']:8s} "
        f"transformers {row['transformers_seconds'] * 1e3:8.1f} ms  hrperc {row['hrperc_seconds'] * 1e3:8.1f} ms  "
        f"speed x{row['speedup']:.2f} (cpu x{row['cpu_speedup']:.2f})  memory rise {t_mem:7.1f} -> {h_mem:7.1f} MiB "
        f"(x{row['memory_ratio']:.2f})  max|diff| {row['max_abs_diff']:.2e} (of {row['max_abs_ref']:.2e})"
    )
    ms = {name: {k: round(v * 1e3, 1) for k, v in row[f"{name}_split"].items()} for name in ("hrperc", "transformers")}
    return f"{head}\n    split (ms): hrperc {ms['hrperc']}; transformers {ms['transformers']}"


def run_native(args) -> dict:
    """The native rows: (a) per recipe and dtype, 8 images; (b) preprocessing, 8 and 32 images; (c) fp32, 32 images."""
    budget = dict(
        depth=args.native_depth,
        max_pixels=args.native_max_pixels,
        longest_edge=args.native_longest_edge,
        out_hidden=args.native_out_hidden,
    )
    reps, dtypes, recipes, counts = args.native_reps, ("float32", "bfloat16"), list(NATIVE), (8, 32)
    if args.quick:
        reps, dtypes, recipes, counts = 1, ("float32",), recipes[:1], (8,)
    rows, pre, load_start = [], [], _loadavg()
    for recipe in recipes:
        model, proc, options = build_native(recipe, budget)
        enc = native_paths(recipe, model, proc, options, torch.float32)[2]
        for n, pil in [(n, pil) for n in counts for pil in (False, True)]:  # (b) first, while the model is fp32
            res = bench_native_preprocess(recipe, n, 3 * reps, proc, enc, pil=pil)
            pre.append(res)
            print(
                f"{recipe:10s} {n:2d} images ({res['input']:6s}) preprocessing: transformers "
                f"{res['transformers_seconds'] * 1e3:7.1f} ms  hrperc {res['hrperc_seconds'] * 1e3:7.1f} ms  "
                f"speed x{res['speedup']:.2f} (cpu x{res['cpu_speedup']:.2f})  pixels equal {res['pixels_equal']}",
                flush=True,
            )
        for dtype_name in dtypes:
            for n in counts if dtype_name == "float32" else counts[:1]:  # (c): the 32-image row in fp32
                row = bench_native_row(recipe, dtype_name, n, reps, budget, model, proc, options)
                rows.append(row)
                print(describe_native(row), flush=True)
    meta = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "budget": budget,
        "sides": NATIVE_SIDES,
        "reps": reps,
        "preprocess_reps": 3 * reps,
        "loadavg_start": load_start,
        "loadavg_end": _loadavg(),
    }
    return {"meta": meta, "rows": rows, "preprocess": pre}


# --- the tiling recipes of Idefics3, SmolVLM, Gemma 3 and MiniCPM-V: towers of the real width, 2 blocks --------
TILING_NEW = ("idefics3", "smolvlm", "minicpm_v", "gemma3")
#: per recipe, the budget of this machine's rows (see ``--tiling-new``): Idefics3 and SmolVLM resize to a longest
#: edge of one tile (one 364 / 512 px view an image; the released 4 tiles make 5 - 17 views), MiniCPM-V slices
#: at most 2 (the released 9), Gemma 3 has no budget to cut (one 896 px view an image, pan and scan off as
#: released); Gemma 3 runs 1 interleaved call, the others 3; memory: MiniCPM-V the median of 3 fresh processes
#: per path, the other rows 1
TILING_NEW_BUDGET = {
    "idefics3": dict(longest_edge=364, reps=3, memory_runs=1),
    "smolvlm": dict(longest_edge=512, reps=3, memory_runs=1),
    "minicpm_v": dict(max_slice_nums=2, reps=3, memory_runs=3),
    "gemma3": dict(reps=1, memory_runs=1),
}


def build_tiling_new(recipe: str, depth: int = 2, seed: int = 0):
    """``(model, processor, options)``: a random transformers model whose vision tower has the real width cut to
    ``depth`` blocks (tiny 64-wide text model), its image processor and ``create_encoder``'s options.

    ``idefics3``: SigLIP so400m-like (1152 wide, MLP 4304, 16 heads), 364 px tiles of 14 px patches, pixel shuffle
    2; ``smolvlm``: 768 wide (MLP 3072, 12 heads), 512 px tiles of 16 px, shuffle 4; ``gemma3``: SigLIP 1152 wide,
    896 px of 14 px pooled to 256 tokens; ``minicpm_v``: MiniCPM-V 4.6's tower (1152 wide, 980 px positions,
    window merger after block 0), 448 px slices."""
    import transformers as tf

    torch.manual_seed(seed)
    so400m = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=depth, num_attention_heads=16)
    llama = tf.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    budget = TILING_NEW_BUDGET[recipe]
    if recipe in ("idefics3", "smolvlm"):
        if recipe == "idefics3":
            tile, vision = 364, tf.Idefics3VisionConfig(image_size=364, patch_size=14, **so400m)
            cfg = tf.Idefics3Config(vision_config=vision, text_config=llama, scale_factor=2, image_token_id=255)
            model, ip_cls = tf.Idefics3ForConditionalGeneration(cfg), tf.Idefics3ImageProcessor
        else:
            small = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=depth, num_attention_heads=12)
            tile, vision = 512, tf.SmolVLMVisionConfig(image_size=512, patch_size=16, **small)
            cfg = tf.SmolVLMConfig(vision_config=vision, text_config=llama, scale_factor=4, image_token_id=255)
            model, ip_cls = tf.SmolVLMForConditionalGeneration(cfg), tf.SmolVLMImageProcessor
        edge = budget["longest_edge"]
        proc = ip_cls(size={"longest_edge": edge}, max_image_size={"longest_edge": tile})
        options = dict(longest_edge=edge)
    elif recipe == "gemma3":
        text = tf.Gemma3TextConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        )
        vision = tf.SiglipVisionConfig(image_size=896, patch_size=14, vision_use_head=False, **so400m)
        cfg = tf.Gemma3Config(
            text_config=text,
            vision_config=vision,
            mm_tokens_per_image=256,
            boi_token_index=253,
            eoi_token_index=254,
            image_token_index=255,
        )
        model = tf.Gemma3ForConditionalGeneration(cfg)
        with torch.no_grad():  # transformers starts the projection at zero, which would hide the features
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.02)
        proc = tf.Gemma3ImageProcessor(size={"height": 896, "width": 896}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        options = dict(mm_tokens_per_image=256)
    else:
        vision = dict(so400m, patch_size=14, image_size=980, insert_layer_id=0)
        cfg = tf.MiniCPMV4_6Config(
            vision_config=vision, text_config=llama, insert_layer_id=0, image_token_id=255, video_token_id=254
        )
        model = tf.MiniCPMV4_6ForConditionalGeneration(cfg)
        options = dict(scale_resolution=448, max_slice_nums=budget["max_slice_nums"])
        proc = tf.MiniCPMV4_6ImageProcessor(**options)
    return model.eval(), proc, options


def tiling_new_paths(recipe: str, model, proc, options: dict):
    """``(transformers_fn, hrperc_fn)``: images -> one ``(tokens, D)`` tensor of the batch's image features in
    the model's order (the processor's image-token positions, images in turn), fp32.

    transformers: the image processor, then ``model.model.get_image_features``; hrperc:
    ``create_encoder(recipe, tower, **options)(images, project=...)`` (MiniCPM-V: the tokens outside the marker
    slots)."""
    inner = model.model
    if recipe in ("idefics3", "smolvlm"):
        tower, project = inner.vision_model, inner.connector.modality_projection
    elif recipe == "gemma3":
        tower, project = inner.vision_tower, inner.multi_modal_projector
    else:
        tower, project = inner.vision_tower, inner.merger
    enc = hrperc.create_encoder(recipe, tower, **options)

    @torch.inference_mode()
    def run_transformers(images, times):
        t0 = time.perf_counter()
        if recipe == "minicpm_v":
            batch = proc(images=images, return_tensors="pt")
        else:
            batch = proc(images=[[img] for img in images], return_tensors="pt")
        t1 = time.perf_counter()
        if recipe in ("idefics3", "smolvlm"):
            out = inner.get_image_features(batch["pixel_values"], batch["pixel_attention_mask"]).pooler_output
        elif recipe == "gemma3":
            out = inner.get_image_features(batch["pixel_values"]).pooler_output
        else:
            out = inner.get_image_features(batch["pixel_values"], batch["target_sizes"]).pooler_output
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in out])
        times["processor"] = times.get("processor", 0.0) + t1 - t0
        times["model"] = times.get("model", 0.0) + time.perf_counter() - t1
        return feats

    @torch.inference_mode()
    def run_hrperc(images, times):
        out = enc(images, project=project, timings=True)
        for k, v in out.timings.items():
            times[k] = times.get(k, 0.0) + v
        slots = out.slot_mask
        keep = [
            out.tokens[b, :n] if slots is None else out.tokens[b, :n][~slots[b, :n]]
            for b, n in enumerate(out.num_tokens)
        ]
        return torch.cat(keep)

    return run_transformers, run_hrperc, enc


def tiling_new_worker(spec: dict) -> dict:
    """One memory measurement of one path of a ``TILING_NEW`` recipe in this (fresh) process."""
    model, proc, options = build_tiling_new(spec["recipe"], spec["depth"])
    fn = dict(zip(("transformers", "hrperc"), tiling_new_paths(spec["recipe"], model, proc, options)[:2]))[spec["path"]]
    images = images_of(native_sizes(spec["images"]))
    fn(images_of([(64, 64)]), {})  # warm-up with a small image
    return measure_memory_here(lambda: fn(images, {}), torch.device("cpu"))


def bench_tiling_new_row(recipe: str, depth: int, n_images: int = 8) -> dict:
    """Both paths interleaved (median of the budget's reps, wall and CPU), then memory in fresh processes."""
    budget = TILING_NEW_BUDGET[recipe]
    reps, runs = budget["reps"], budget["memory_runs"]
    model, proc, options = build_tiling_new(recipe, depth)
    run_t, run_h, enc = tiling_new_paths(recipe, model, proc, options)
    sizes = native_sizes(n_images)
    images = images_of(sizes)
    run_t(images_of([(64, 64)]), {}), run_h(images_of([(64, 64)]), {})
    secs: dict[str, list[float]] = {"transformers": [], "hrperc": []}
    cpu: dict[str, list[float]] = {"transformers": [], "hrperc": []}
    split: dict[str, dict] = {"transformers": {}, "hrperc": {}}
    outs = {}
    for _ in range(reps):  # interleaved
        for name, fn in (("transformers", run_t), ("hrperc", run_h)):
            t0, c0 = time.perf_counter(), time.process_time()
            outs[name] = fn(images, split[name])
            secs[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    ref, mine = outs["transformers"], outs["hrperc"]
    same = ref.shape == mine.shape
    row = {
        "recipe": recipe,
        "dtype": "float32",
        "images": n_images,
        "sizes": sizes,
        "options": options,
        "depth": depth,
        "reps": reps,
        "memory_runs": runs,
        "views": sum(enc.plan(s).views for s in sizes),
        "tokens": [enc.num_tokens(s) for s in sizes],
        "same_shapes": same,
        "max_abs_diff": (ref - mine).abs().max().item() if same else float("nan"),
        "max_abs_ref": ref.abs().max().item(),
    }
    for name in secs:
        row[f"{name}_seconds"] = statistics.median(secs[name])
        row[f"{name}_all_seconds"] = secs[name]
        row[f"{name}_split"] = {k: v / reps for k, v in split[name].items()}
        row[f"{name}_cpu_seconds"] = statistics.median(cpu[name])
    row["speedup"] = row["transformers_seconds"] / row["hrperc_seconds"]
    row["cpu_speedup"] = row["transformers_cpu_seconds"] / row["hrperc_cpu_seconds"]
    del model, enc
    for name in ("transformers", "hrperc"):
        spec = dict(recipe=recipe, depth=depth, images=n_images, path=name, tiling_new=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        got = []
        for _ in range(runs):  # RSS peaks vary with the allocator's state: the median of fresh processes
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise RuntimeError(f"memory worker {spec} failed:\n{res.stderr[-3000:]}")
            got.append(json.loads(res.stdout.strip().splitlines()[-1]))
        got.sort(key=lambda r: r["rise_mib"])
        row[f"{name}_memory"] = {**got[len(got) // 2], "all_rise_mib": [r["rise_mib"] for r in got]}
    row["memory_ratio"] = row["hrperc_memory"]["rise_mib"] / max(row["transformers_memory"]["rise_mib"], 1e-9)
    return row


def run_tiling_new(args) -> dict:
    """The ``TILING_NEW`` rows, fp32, 8 images; the results file is rewritten after every row. A subset
    (``--tiling-new-recipes``) replaces its own rows in the file and keeps the others (each row records the
    load and date of its run under ``"run"``)."""
    recipes = [r for r in TILING_NEW if r in (args.tiling_new_recipes or TILING_NEW)]
    out = RESULTS / "bench_recipes_tiling_new.json"
    kept = []
    if args.tiling_new_recipes and out.exists():
        previous = json.loads(out.read_text())
        kept = [r for r in previous["rows"] if r["recipe"] not in recipes]
        for r in kept:  # a row of an earlier run keeps that run's load
            r.setdefault("run", {k: previous["meta"].get(k) for k in ("loadavg_start", "loadavg_end")})
    res: dict = {
        "meta": {
            "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "depth": args.native_depth,
            "sides": NATIVE_SIDES,
            "budget": TILING_NEW_BUDGET,
            "loadavg_start": _loadavg(),
        },
        "rows": [],
    }
    RESULTS.mkdir(exist_ok=True)
    for recipe in recipes:
        start = _loadavg()
        row = bench_tiling_new_row(recipe, args.native_depth)
        row["run"] = {
            "loadavg_start": start,
            "loadavg_end": _loadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        res["rows"].append(row)
        res["meta"]["loadavg_end"] = _loadavg()
        print(describe_native({**row, "patches": row["views"]}).replace("patches", "views"), flush=True)
        rows = sorted(kept + res["rows"], key=lambda r: TILING_NEW.index(r["recipe"]))
        out.write_text(json.dumps({**res, "rows": rows}, indent=1))
    return res


def _loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


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
    ap.add_argument("--native-only", action="store_true", help="only the native-resolution rows (Qwen2.5-VL, Pixtral)")
    ap.add_argument("--native-reps", type=int, default=3, help="interleaved calls per native row (preprocessing: 3x)")
    ap.add_argument("--native-depth", type=int, default=2, help="blocks of the real-width towers")
    ap.add_argument("--native-max-pixels", type=int, default=NATIVE_MAX_PIXELS, help="Qwen2.5-VL's max_pixels")
    ap.add_argument("--native-longest-edge", type=int, default=NATIVE_LONGEST_EDGE, help="Pixtral's longest_edge")
    ap.add_argument("--native-out-hidden", type=int, default=NATIVE_OUT_HIDDEN, help="Qwen2.5-VL's merger width")
    ap.add_argument("--tiling-new", action="store_true", help="only the idefics3 / smolvlm / minicpm_v / gemma3 rows")
    ap.add_argument("--tiling-new-recipes", nargs="*", help="a subset of the --tiling-new rows")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        if spec.get("tiling_new"):
            print(json.dumps(tiling_new_worker(spec)))
        else:
            print(json.dumps(native_worker(spec) if spec.get("native") else worker(spec)))
        return 0
    if args.tiling_new:
        run_tiling_new(args)
        return 0
    if args.inf_llava:
        res = bench_inf_llava_dtypes(args.inf_llava_depth, args.reps)
        print(json.dumps(res, indent=1))
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "bench_recipes_inf_llava_bf16.json").write_text(json.dumps(res, indent=1))
        return 0
    if not args.native_only:
        run_tiled(args)
        if args.quick:  # --quick smoke-tests the tiled rows; --quick --native-only the native ones
            return 0
    native = run_native(args)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "bench_recipes_native.json").write_text(json.dumps(native, indent=1))
    return 0


def run_tiled(args) -> None:
    """The anyres / tiling rows (``RECIPES``): one image and a ragged batch of 8, fp32 and bf16."""
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


if __name__ == "__main__":
    sys.exit(main())
