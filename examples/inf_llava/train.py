"""Train INF-LLaVA: stage 1 (DEM + projector) or stage 2 (DEM + projector + LLM), 1 process, DDP or FSDP.

Examples (from the repository root)::

    python examples/inf_llava/train.py --config tiny --stage 1 --steps 300 --out runs/tiny-s1
    python examples/inf_llava/train.py --config tiny --stage 2 --steps 300 --init-from runs/tiny-s1/checkpoint-300 \\
        --out runs/tiny-s2
    torchrun --nproc_per_node 2 examples/inf_llava/train.py --config tiny --dist ddp  --steps 50 --out runs/ddp
    torchrun --nproc_per_node 2 examples/inf_llava/train.py --config tiny --dist fsdp --steps 50 --out runs/fsdp
    python examples/inf_llava/train.py ... --resume auto          # continue from the latest checkpoint
    torchrun --nproc_per_node 2 examples/inf_llava/train.py --dist ddp --device cpu ...   # gloo on CPU

``--device auto`` (default) runs on GPUs (one per process, nccl for ddp/fsdp) only when the node has
at least as many visible GPUs as processes; otherwise on CPU with gloo, and rank 0 says so.
``--device`` / ``--dist-backend`` force a choice.

Sec. 5.2 of the paper: stage 1 freezes the ViT and the LLM and trains the DEM and the projector
(AdamW, lr 1e-3, cosine schedule with warmup); stage 2 freezes the ViT and trains the DEM, the
projector and the LLM (lr 2e-5). ``--batch-size`` is the global batch of one optimizer step; it is
split over processes and ``--micro-batch-size`` micro-batches (gradient accumulation). The loss is
the mean over all label tokens of the global batch whatever the split, so 1 process x 2 micro-batches
and 2 processes x 1 micro-batch take the same steps.

The data (``--data glyphs``) is the synthetic high-resolution task of ``data.py``, generated on the
fly from the sample index, so any rank can make its share and a resumed run sees the same samples.

Every path (``--init-from``, ``--resume``, ``--data llava:...``, ``--out``, the ``llama3-8b`` directories) is
checked before the model is built; a bad argument or path ends the script with one line on stderr and
exit code 2 (``--traceback`` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `inf_llava` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from inf_llava.checkpoint import latest_checkpoint, load_checkpoint, load_trained_weights, save_checkpoint
from inf_llava.configs import CONFIGS, build_tokenizer, get_config
from inf_llava.data import build_dataset, collate
from inf_llava.model import (
    IGNORE_INDEX,
    build_inf_llava,
    model_num_tokens,
    set_stage,
    token_loss_sum,
)
from inf_llava.script import (
    Parser,
    check_checkpoint,
    check_model_paths,
    check_out_dir,
    fraction,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    run_script,
)

__all__ = ["parse_args", "check_inputs", "train", "main", "choose_device_backend", "STAGE_LR"]

STAGE_LR = {1: 1e-3, 2: 2e-5}


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(
        prog="train.py", description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    p.add_argument("--llm-dir", help="llama3-8b: local transformers LLaMA-3-8B directory (or $INF_LLAVA_LLM_DIR)")
    p.add_argument("--clip-dir", help="llama3-8b: local transformers CLIP ViT-L/14-336 directory")
    p.add_argument("--weights", help="llama3-8b: released INF-LLaVA DEM + projector weights (file or dir)")
    p.add_argument("--stage", type=int, default=1, choices=(1, 2))
    p.add_argument("--steps", type=positive_int("--steps"), default=300, help="optimizer steps")
    p.add_argument(
        "--batch-size", type=positive_int("--batch-size", "16"), default=16, help="global batch per optimizer step"
    )
    p.add_argument(
        "--micro-batch-size",
        type=positive_int("--micro-batch-size", "4"),
        default=None,
        help="per process and forward (default: all)",
    )
    p.add_argument("--lr", type=positive_float("--lr"), default=None, help="default: 1e-3 (stage 1), 2e-5 (stage 2)")
    p.add_argument("--warmup-ratio", type=fraction("--warmup-ratio"), default=0.03)
    p.add_argument("--weight-decay", type=nonnegative_float("--weight-decay"), default=0.0)
    p.add_argument(
        "--max-grad-norm", type=nonnegative_float("--max-grad-norm", "1.0"), default=1.0, help="0: no clipping"
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "bf16", "fp32"),
        help="bf16 autocast; auto = bf16 on a GPU that supports it, fp32 on CPU",
    )
    p.add_argument("--dist", default="none", choices=("none", "ddp", "fsdp"))
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="auto: one GPU per process when this node has enough for its processes, else CPU",
    )
    p.add_argument(
        "--dist-backend",
        default="auto",
        choices=("auto", "gloo", "nccl"),
        help="process-group backend for ddp/fsdp; auto: nccl on GPUs, gloo on CPU",
    )
    p.add_argument("--out", default="runs/inf_llava", help="checkpoint directory")
    p.add_argument(
        "--save-every",
        type=nonnegative_int("--save-every", "500"),
        default=0,
        help="also save every N steps (0: only at the end)",
    )
    p.add_argument("--resume", default=None, help="'auto' (latest under --out) or a checkpoint directory")
    p.add_argument("--init-from", default=None, help="load trained weights (e.g. stage 1's) before training")
    p.add_argument("--data", default="glyphs", help="'glyphs' (synthetic) or 'llava:<annotations.json>:<image dir>'")
    p.add_argument("--seed", type=int, default=0, help="data seed")
    p.add_argument(
        "--glyph-size",
        type=positive_int("--glyph-size", "12"),
        default=None,
        help="glyph side in pixels (default: canvas / 8)",
    )
    p.add_argument("--summary-json", default=None, help="write losses and timings (rank 0) to this file")
    p.add_argument(
        "--dump-params",
        default=None,
        help="test hook: each rank writes its local trainable parameters to DIR/rank<r>.safetensors",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--traceback", action="store_true", help="show the traceback of an error (default: one line)")
    return p.parse_args(argv)


def check_inputs(args, cfg) -> None:
    """Every path the run reads or writes, before any model is built: the config's local directories and
    weights, ``--init-from``, ``--resume``, ``--data llava:...``, ``--out``, ``--summary-json``."""
    check_model_paths(cfg)
    if args.init_from:
        check_checkpoint(args.init_from, "--init-from")
    if args.resume and args.resume != "auto":
        check_checkpoint(args.resume, "--resume", resume=True)
    if args.data == "glyphs" and args.glyph_size and 3 * args.glyph_size > min(cfg.image_size):
        raise ValueError(
            f"--glyph-size {args.glyph_size}: three glyphs must fit across the {cfg.image_size[1]}x{cfg.image_size[0]} "
            f"canvas of config {cfg.name!r}; use at most --glyph-size {min(cfg.image_size) // 3}."
        )
    if args.data != "glyphs":
        kind, _, rest = args.data.partition(":")
        json_path, _, folder = rest.partition(":")
        if kind == "llava" and json_path and folder:
            for path, what in ((Path(json_path), "annotations JSON file"), (Path(folder), "image folder")):
                if not path.exists():
                    raise FileNotFoundError(
                        f"--data {args.data!r}: there is no {what} at {str(path)!r}. Check the path "
                        "(--data llava:<annotations.json>:<image folder>)."
                    )
            if not Path(folder).is_dir():
                raise NotADirectoryError(f"--data {args.data!r}: {folder!r} is not a folder. Pass the image folder.")
    check_out_dir(args.out, "--out")
    if args.summary_json:
        if Path(args.summary_json).is_dir():
            raise IsADirectoryError(f"--summary-json {args.summary_json!r} is a directory. Pass a file name.")
        check_out_dir(Path(args.summary_json).parent, "--summary-json")


def choose_device_backend(
    device: str, backend: str, *, n_gpus: int, local_world: int, distributed: bool
) -> tuple[str, str | None, str | None]:
    """Resolve ``--device`` / ``--dist-backend`` to ``(device type, backend or None, note or None)``.

    ``auto`` takes one GPU per process (and nccl) only when the node has at least ``local_world`` GPUs;
    otherwise CPU and gloo, with a note saying why. Explicit choices that cannot work raise ``ValueError``.
    """
    note = None
    if device == "auto" and distributed and backend == "nccl":
        device = "cuda"  # nccl was asked for: insist on GPUs (and say so below if there are too few)
    if device == "auto":
        enough = n_gpus >= (local_world if distributed else 1)
        device = "cuda" if n_gpus and enough else "cpu"
        if n_gpus and not enough:
            note = (
                f"train.py: {local_world} processes on this node but {n_gpus} visible GPU(s); running on CPU "
                "with gloo (one GPU per process is needed for nccl). Pass --device cpu to silence this, or "
                "launch at most one process per GPU."
            )
    elif device == "cuda":
        if n_gpus == 0:
            raise ValueError("train.py: --device cuda but no CUDA GPU is visible; use --device cpu or auto.")
        if distributed and n_gpus < local_world:
            raise ValueError(
                f"train.py: --device cuda with {local_world} processes on this node but only {n_gpus} GPU(s); "
                "launch at most one process per GPU (torchrun --nproc_per_node), or use --device cpu."
            )
    if not distributed:
        return device, None, note
    if backend == "auto":
        backend = "nccl" if device == "cuda" else "gloo"
    elif backend == "nccl" and device != "cuda":
        raise ValueError("train.py: --dist-backend nccl needs GPUs; use --dist-backend gloo with --device cpu.")
    return device, backend, note


def _setup_distributed(mode: str, device: str = "auto", backend: str = "auto"):
    """Init the process group for ddp/fsdp (see :func:`choose_device_backend`); returns rank, world, device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "none" and world > 1:
        raise ValueError(f"train.py: launched with WORLD_SIZE={world} but --dist none; pass --dist ddp or fsdp.")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    dev, backend, note = choose_device_backend(
        device,
        backend,
        n_gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0,
        local_world=local_world,
        distributed=mode != "none",
    )
    if note and int(os.environ.get("RANK", "0")) == 0:
        print(note, file=sys.stderr, flush=True)
    if mode == "none":
        return 0, 1, torch.device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if dev == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _wrap(model, mode: str, device):
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        for layer in model.model.language_model.modules():
            if isinstance(layer, LlamaDecoderLayer):
                fully_shard(layer)
        return fully_shard(model)
    return model


def _use_bf16(precision: str, device) -> bool:
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def _micro_batches(step: int, args, rank: int, world: int) -> list[list[int]]:
    """Sample indices of this rank's micro-batches at ``step``: rank r takes a contiguous share."""
    per_rank = args.batch_size // world
    mb = args.micro_batch_size or per_rank
    first = step * args.batch_size + rank * per_rank
    return [list(range(first + i, first + min(i + mb, per_rank))) for i in range(0, per_rank, mb)]


def _all_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def _sync_context(model, mode: str, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if mode == "ddp" and not last:
        return model.no_sync()
    if mode == "fsdp":
        model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def train(argv=None, *, return_model: bool = False) -> dict:
    """Run one training stage; returns a summary (losses per step, tokens/s, checkpoint path).

    With ``return_model`` the summary also holds ``"model"``: the trained ``LlavaForConditionalGeneration`` (unwrapped
    from DDP; for tests and notebooks, single process), every parameter, frozen ones included.
    """
    args = parse_args(argv)
    rank, world, device = _setup_distributed(args.dist, args.device, args.dist_backend)
    if args.batch_size % world or (args.micro_batch_size and (args.batch_size // world) % args.micro_batch_size):
        raise ValueError(
            f"train.py: --batch-size {args.batch_size} must split evenly over {world} process(es) and then into "
            f"micro-batches of {args.micro_batch_size}; use sizes with batch_size % (world * micro) == 0."
        )
    cfg = get_config(args.config, llm_dir=args.llm_dir, clip_dir=args.clip_dir, weights=args.weights)
    check_inputs(args, cfg)
    # The data before the model: a bad --data / --glyph-size fails in a second, not after the build.
    try:
        task = build_dataset(args.data, cfg, glyph_size=args.glyph_size, seed=args.seed)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"--data {args.data!r}: the annotations file is not valid JSON ({exc}). Check the file."
        ) from exc
    tokenizer = build_tokenizer(cfg)
    bf16 = _use_bf16(args.precision, device)
    # Stage 1 never updates the LLM: keep it in bf16 when computing in bf16 (half the memory).
    llm_dtype = torch.bfloat16 if (bf16 and args.stage == 1) else torch.float32
    model = build_inf_llava(cfg, tokenizer, llm_dtype=llm_dtype)
    if args.init_from:
        load_trained_weights(args.init_from, model)
    trainable = set_stage(model, args.stage)
    num_tokens = model_num_tokens(model)  # image placeholders per image, for collate
    model.to(device)
    model = _wrap(model, args.dist, device)

    lr = args.lr if args.lr is not None else STAGE_LR[args.stage]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * args.steps), args.steps)

    start, losses = 0, []
    resume = latest_checkpoint(args.out) if args.resume == "auto" else args.resume
    if resume:
        meta = load_checkpoint(resume, model, optimizer, scheduler)
        start, losses = int(meta["step"]), list(meta.get("losses", []))

    bar = tqdm(total=args.steps, initial=start, disable=rank != 0 or args.no_progress, desc=f"stage {args.stage}")
    tokens_seen, t0 = 0, time.perf_counter()
    model.train()
    for step in range(start, args.steps):
        batches = [
            collate(task.batch(idx), tokenizer, cfg, num_tokens) for idx in _micro_batches(step, args, rank, world)
        ]
        # Normalise by the label tokens of the whole global batch, so every split gives the same gradient.
        local_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        global_targets = _all_sum(torch.tensor(float(local_targets), device=device))
        loss_sum = torch.zeros((), device=device)
        n_tokens = torch.zeros((), device=device)
        for i, batch in enumerate(batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            with _sync_context(model, args.dist, last=i == len(batches) - 1):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = model(**batch, use_cache=False).logits
                micro_sum, _ = token_loss_sum(logits, labels)
                # DDP/FSDP average gradients over ranks: multiply by world to get the global-token mean.
                (micro_sum * world / global_targets).backward()
            loss_sum += micro_sum.detach()
            n_tokens += batch["attention_mask"].sum()  # real positions (text + visual) the LLM processed
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(_all_sum(loss_sum) / global_targets)
        tokens_seen += int(_all_sum(n_tokens))
        losses.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save_checkpoint(args.out, model, optimizer, scheduler, step + 1, _meta(args, losses))
    bar.close()
    elapsed = time.perf_counter() - t0
    ckpt = save_checkpoint(args.out, model, optimizer, scheduler, args.steps, _meta(args, losses))
    if args.dump_params:
        _dump_local_params(model, args.dump_params, rank)
    summary = {
        "config": cfg.name,
        "stage": args.stage,
        "dist": args.dist,
        "world_size": world,
        "start_step": start,
        "losses": losses,
        "trainable": trainable,
        "tokens_per_s": tokens_seen / elapsed if elapsed > 0 and tokens_seen else None,
        "checkpoint": str(ckpt),
        "rank": rank,
    }
    if args.summary_json and rank == 0:
        Path(args.summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary_json).write_text(json.dumps(summary, indent=1))
    if args.dist != "none":
        dist.barrier()
        dist.destroy_process_group()
    if return_model:
        summary["model"] = getattr(model, "module", model)
    return summary


def _meta(args, losses) -> dict:
    return {"stage": args.stage, "config": args.config, "losses": losses, "args": vars(args)}


def _dump_local_params(model, out_dir, rank: int) -> None:
    """Each rank's own copy of its trainable parameters (FSDP: its local shards)."""
    from safetensors.torch import save_file

    inner = getattr(model, "module", model)
    local = {}
    for name, p in inner.named_parameters():
        if p.requires_grad:
            t = p.to_local() if hasattr(p, "to_local") else p
            local[name] = t.detach().cpu().contiguous().clone()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_file(local, Path(out_dir) / f"rank{rank}.safetensors")


def main(argv=None) -> None:
    """``train`` as a script: a bad argument or path ends it with one line on stderr and exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    summary = run_script(train, argv, "train.py", traceback="--traceback" in argv)
    if not summary["losses"]:
        return
    if summary["rank"] == 0:
        first, last = summary["losses"][0], summary["losses"][-1]
        print(f"stage {summary['stage']}: loss {first:.4f} -> {last:.4f}; checkpoint {summary['checkpoint']}")


if __name__ == "__main__":
    main()
