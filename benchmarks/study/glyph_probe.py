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

Held-out accuracy (256 crops of the test split) is printed every ``--every`` steps, and as JSON lines with
the run's CPU seconds when a place's run ends. The training is the runner's stage 0 (``run.pretrain_tower``)
with ``place`` varied: its schedule (warm-up, cosine to 0 at ``--steps``), batches and held-out crops.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study.run import STUDY, pretrain_tower  # noqa: E402
from study.task import PLACES  # noqa: E402


def probe(place: str, steps: int, every: int, seed: int = 0, glyph_scale: int = 1, log=print) -> list[dict]:
    """Train on the glyph question of ``place``-d crops (the runner's stage 0 with another ``place``); the
    held-out accuracy every ``every`` steps, as JSON lines."""
    out = pretrain_tower(STUDY, seed, steps, glyph_scale=glyph_scale, place=place, every=every, log=log)
    points = [{"place": place, "glyph_scale": glyph_scale, **point} for point in out["curve"]]
    for point in points:
        log(json.dumps(point))
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
