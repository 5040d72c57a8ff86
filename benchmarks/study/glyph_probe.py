"""Why the fine-detail questions stay at chance (``docs/study.md``, "What limits the study").

    python benchmarks/study/glyph_probe.py --place centred --steps 1000
    python benchmarks/study/glyph_probe.py --place patch --steps 1000
    python benchmarks/study/glyph_probe.py --place pixel --steps 1000

No front end: the study's tower and head (``run.py``'s ``llava15`` configuration, one 224 px view) are
trained on the ``glyph`` question alone, each image a 224 px crop of the 672 px task image at full
resolution, around the red ring, so the glyph is always in view at its full 5 px. Where it sits in the
crop is the variable:

``centred``  at the crop's centre, on a patch corner: the same pixels relative to the 16 px patch grid
             in every image;
``patch``    moved by a whole number of patches (up to 5 each way): anywhere on the patch grid, always
             at the same place inside its patch;
``pixel``    moved by any number of pixels (up to 80 each way), as in the task: at any place inside a patch;
``thumbnail`` no crop: the whole image resized to 224 px (what the single-view baseline sees).

``--glyph-scale K`` draws the task's glyphs K times larger (``task.make_batch``'s ``glyph_scale``).

Held-out accuracy (256 crops of the test split) is printed every ``--every`` steps, with the run's CPU
seconds. The learning-rate schedule is the runner's (warm-up, cosine to 0 at ``--steps``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study.run import STUDY, _lr, build_model  # noqa: E402
from study.task import PLACES, make_batch, ring_crops  # noqa: E402


def probe(place: str, steps: int, every: int, seed: int = 0, glyph_scale: int = 1, log=print) -> list[dict]:
    """Train on the glyph question of ``place``-d crops; the held-out accuracy every ``every`` steps."""
    model = build_model("llava15", STUDY, seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=STUDY.lr, weight_decay=0.05)
    test_x, test_y = make_batch(range(256), STUDY.size, 0, "test", glyph_scale)
    test_x = ring_crops(test_x, place)
    points, c0 = [], time.process_time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(STUDY, step / steps)
        x, y = make_batch(range(step * STUDY.batch, (step + 1) * STUDY.batch), STUDY.size, 0, "train", glyph_scale)
        loss = F.cross_entropy(model(ring_crops(x, place))[:, 0], y[:, 0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            model.eval()
            with torch.no_grad():
                right = sum(
                    (model(test_x[i : i + 32])[:, 0].argmax(-1) == test_y[i : i + 32, 0]).sum().item()
                    for i in range(0, 256, 32)
                )
            model.train()
            points.append(
                {
                    "place": place,
                    "glyph_scale": glyph_scale,
                    "step": step + 1,
                    "cpu_s": round(time.process_time() - c0),
                    "glyph": right / 256,
                }
            )
            log(json.dumps(points[-1]))
    return points


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--place", choices=PLACES, nargs="+", default=list(PLACES))
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--glyph-scale", type=int, default=1, help="the task's glyphs this many times larger (1..3)")
    a = p.parse_args(argv)
    if a.steps < 1 or a.every < 1:
        p.error(f"--steps {a.steps} and --every {a.every} must be >= 1")
    torch.set_num_threads(a.threads)
    for place in a.place:
        probe(place, a.steps, a.every, a.seed, a.glyph_scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
