"""INF-LLaVA ``tiny`` training throughput on this machine, and where a step's time goes.

    flock /tmp/hrperc-bench.lock python benchmarks/bench_inf_llava_train.py [--steps 20] [--threads 1 2]

For each stage (1: DEM + projector train; 2: + LLM) and thread count, two measurements in one run:

* ``full``: median time of the real training step (the attached ``LlavaForConditionalGeneration``'s forward,
  the summed token loss, backward, AdamW), and tokens/s
  (all positions the LLM processes: text + visual, batch of 16 glyph samples);
* ``split``: the same step cut at the two boundaries (ViT features, DEM tokens) with detached leaves, so
  each part's forward and backward can be timed alone: vision front end (crop + frozen ViT, no backward),
  DEM (forward + backward), LLM side (projector + merge + LLaMA forward + backward), optimizer. The
  split step does the same arithmetic; its total is reported next to ``full`` as a check.

Writes ``inf_llava_train.json`` and ``inf_llava_train.png`` (shares per stage) to ``--out``.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from inf_llava import build_inf_llava, build_tokenizer, get_config  # noqa: E402
from inf_llava.data import GlyphTask, collate  # noqa: E402
from inf_llava.model import encoder_of, model_num_tokens, set_stage, token_loss_sum  # noqa: E402


def _inputs(batch) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}


def _full_step(model, opt, batch):
    out = model(**_inputs(batch), use_cache=False)
    loss_sum, n = token_loss_sum(out.logits, batch["labels"])
    (loss_sum / n.clamp(min=1)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return int(batch["attention_mask"].sum())


def _split_step(model, opt, batch) -> dict[str, float]:
    """One step, timed per part. Same maths as the full step (gradients meet at the detached leaves)."""
    from hrperc.integrations.transformers import unpack_images

    enc = encoder_of(model)
    t = [time.perf_counter()]
    sub = enc.subimage_features(unpack_images(batch["pixel_values"]))  # crop + frozen ViT (no graph)
    t.append(time.perf_counter())
    ht, wt = enc.tile_tokens
    hi = enc.dem(sub.local, sub.strided, tuple(sub.crops.geometries[0].grid), tile_size=(ht, wt))
    tokens = enc.front_end.combine_tokens(hi, sub.thumbnail)
    t.append(time.perf_counter())
    leaf = tokens.detach().requires_grad_(True)
    inner = model.model
    ids, mask = batch["input_ids"], batch["attention_mask"]
    embeds = inner.get_input_embeddings()(ids)
    visual = inner.multi_modal_projector(leaf).flatten(0, 1).to(embeds.dtype)
    slots = (ids == model.config.image_token_id)[..., None].expand_as(embeds)
    embeds = embeds.masked_scatter(slots, visual)  # what LlavaModel.forward does with the image features
    hidden = inner.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    loss_sum, n = token_loss_sum(model.lm_head(hidden), batch["labels"])
    loss = loss_sum / n.clamp(min=1)
    t.append(time.perf_counter())
    loss.backward()
    t.append(time.perf_counter())
    if tokens.requires_grad:
        tokens.backward(leaf.grad)
    t.append(time.perf_counter())
    opt.step()
    opt.zero_grad(set_to_none=True)
    t.append(time.perf_counter())
    d = [b - a for a, b in zip(t, t[1:])]
    return {
        "vision front end (crop + ViT)": d[0],
        "DEM fwd+bwd": d[1] + d[4],
        "LLM side fwd+bwd (projector, merge, LLaMA)": d[2] + d[3],
        "optimizer": d[5],
    }


def run(stage: int, threads: int, steps: int, batch_size: int) -> dict:
    torch.set_num_threads(threads)
    cfg = get_config("tiny")
    tok = build_tokenizer(cfg)
    model = build_inf_llava(cfg, tok)
    set_stage(model, stage)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    task = GlyphTask(cfg.image_size)
    batches = [
        collate(task.batch(range(i * batch_size, (i + 1) * batch_size)), tok, cfg, model_num_tokens(model))
        for i in range(steps)
    ]
    for b in batches[:3]:  # warm-up
        _full_step(model, opt, b)
        _split_step(model, opt, b)
    full_times, tokens, parts = [], [], []
    for b in batches:
        t0 = time.perf_counter()
        tokens.append(_full_step(model, opt, b))
        full_times.append(time.perf_counter() - t0)
        parts.append(_split_step(model, opt, b))
    full = statistics.median(full_times)
    med = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    split_total = sum(med.values())
    return {
        "stage": stage,
        "threads": threads,
        "batch_size": batch_size,
        "tokens_per_step": statistics.mean(tokens),
        "visual_tokens_per_image": encoder_of(model).num_tokens(cfg.image_size),
        "vit_passes_per_image": encoder_of(model).num_backbone_passes(cfg.image_size),
        "step_s": full,
        "tokens_per_s": statistics.mean(tokens) / full,
        "samples_per_s": batch_size / full,
        "split_step_s": split_total,
        "parts_s": med,
        "shares": {k: v / split_total for k, v in med.items()},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    # What the machine offers, read before run() changes the thread count.
    cpu_count, threads_at_start = os.cpu_count(), torch.get_num_threads()
    rows = [run(stage, th, args.steps, args.batch_size) for th in args.threads for stage in (1, 2)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads_at_start)
    meta = {
        "torch": torch.__version__,
        "cpu_count": cpu_count,
        "cpu_threads_available": threads_at_start,  # torch's intra-op threads before the runs
        "config": "tiny",
    }
    (out / "inf_llava_train.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"{'stage':>5} {'thr':>3} {'step ms':>8} {'split ms':>9} {'tok/s':>8}  shares")
    for r in rows:
        shares = ", ".join(f"{k.split(' (')[0]} {v:.0%}" for k, v in r["shares"].items())
        print(
            f"{r['stage']:>5} {r['threads']:>3} {r['step_s'] * 1e3:8.1f} {r['split_step_s'] * 1e3:9.1f} "
            f"{r['tokens_per_s']:8.0f}  {shares}"
        )
    _plot(rows, out / "inf_llava_train.png")


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"stage {r['stage']}\n{r['threads']} thr\n{r['tokens_per_s']:.0f} tok/s" for r in rows]
    parts = list(rows[0]["shares"])
    fig, ax = plt.subplots(figsize=(1.8 + 1.4 * len(rows), 4))
    bottom = [0.0] * len(rows)
    for part in parts:
        vals = [r["shares"][part] for r in rows]
        ax.bar(labels, vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("share of step time")
    ax.set_title("INF-LLaVA tiny: where a training step's time goes (CPU)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
