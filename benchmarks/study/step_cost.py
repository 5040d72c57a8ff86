"""Where a training step of the study goes (``docs/study.md``, "Step costs").

    python benchmarks/study/step_cost.py --config llava15 s2 inf_llava dcm_local --scale study deep

For each configuration and scale: one training step of the runner (``run.py``), split into its phases --
drawing the batch (``task.make_batch``), the encoder's forward (the recipe's preprocessing, views, tower
and DEM), the head, the backward pass and the optimizer -- as the median over ``--repeat`` steps after
one warm-up step, in CPU seconds of this process (``time.process_time``; on a machine that others share,
wall-clock seconds measure the load as much as the step) and in wall-clock seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study.run import SCALES, build_model, check_config  # noqa: E402
from study.task import NUM_ANSWERS, make_batch  # noqa: E402

PHASES = ("batch", "encoder", "head", "backward", "optimizer")


def step_cost(config: str, scale, repeat: int = 3) -> dict[str, dict[str, float]]:
    """Median CPU and wall seconds per phase of one training step: ``{"cpu": {...}, "wall": {...}}``."""
    model = build_model(config, scale, 0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=scale.lr)
    cpu: dict[str, list[float]] = {k: [] for k in PHASES}
    wall: dict[str, list[float]] = {k: [] for k in PHASES}

    @contextlib.contextmanager
    def timed(phase):
        c0, t0 = time.process_time(), time.perf_counter()
        yield
        cpu[phase].append(time.process_time() - c0)
        wall[phase].append(time.perf_counter() - t0)

    for step in range(repeat + 1):
        with timed("batch"):
            images, answers = make_batch(range(step * scale.batch, (step + 1) * scale.batch), scale.size)
        with timed("encoder"):
            out = model.encoder(images)
        with timed("head"):
            picked = model.config.pick is not None
            logits = model.head(model._pick(out)) if picked else model.head(out.tokens, out.token_mask)
        loss = F.cross_entropy(logits.reshape(-1, NUM_ANSWERS), answers.reshape(-1))
        with timed("backward"):
            opt.zero_grad(set_to_none=True)
            loss.backward()
        with timed("optimizer"):
            opt.step()
    # The first step warms caches and allocators up; the median of the rest.
    return {
        "cpu": {k: statistics.median(v[1:]) for k, v in cpu.items()},
        "wall": {k: statistics.median(v[1:]) for k, v in wall.items()},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", nargs="+", default=["llava15", "s2", "inf_llava", "dcm_local"])
    p.add_argument("--scale", nargs="+", choices=tuple(SCALES), default=["deep", "study"])
    p.add_argument("--size", type=int, default=672)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"{'config':12s} {'scale':6s} " + " ".join(f"{k:>9s}" for k in PHASES) + "   step CPU s  (wall s)")
    for name in a.config:
        check_config(name)
        for s in a.scale:
            scale = SCALES[s] if s == "quick" else dataclasses.replace(SCALES[s], size=a.size)
            c = step_cost(name, scale, a.repeat)
            row = " ".join(f"{c['cpu'][k]:9.3f}" for k in PHASES)
            print(f"{name:12s} {s:6s} {row}   {sum(c['cpu'].values()):10.3f}  ({sum(c['wall'].values()):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
