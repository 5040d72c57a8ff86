"""Pictures for ``docs/study.md``: samples of the task (``python benchmarks/study/figures.py``).

``samples``: three images of the task (672, 1344, 2016 px) with their answers, and under each the
ring's glyph at full resolution next to what a 224 px thumbnail of the whole image keeps of it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study.task import GLYPHS, QUESTIONS, make_sample  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def samples(path: Path = ROOT / "docs" / "img" / "study_samples.png") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = (672, 1344, 2016)
    fig, axes = plt.subplots(2, 3, figsize=(13, 8.2), gridspec_kw={"height_ratios": [3, 1.15]})
    for j, size in enumerate(sizes):
        image, answers = make_sample(size, seed=0, index=j, split="test")
        a = answers.tolist()
        axes[0, j].imshow(image.permute(1, 2, 0).numpy(), interpolation="lanczos")
        for k in (1, 2):  # where a 3 x 3 tiling cuts the image
            axes[0, j].axhline(k * size / 3, color="w", lw=0.6, ls="--")
            axes[0, j].axvline(k * size / 3, color="w", lw=0.6, ls="--")
        axes[0, j].set_title(
            f"{size} px: glyph={GLYPHS[a[0]]}, match={a[1]},\ncount={a[2] + 1} discs, link={a[3]}", fontsize=10
        )
        axes[0, j].axis("off")
        # The ring's glyph: find the red ring, crop around it, at full resolution and from a 224 px thumbnail.
        red = (image[0] > 200) & (image[1] < 60) & (image[2] < 60)
        ys, xs = red.nonzero(as_tuple=True)
        cy, cx, r = int(ys.float().mean()), int(xs.float().mean()), int(size / 96 * 4)
        full = image[:, cy - r : cy + r, cx - r : cx + r]
        thumb = F.interpolate(image[None].float(), size=(224, 224), mode="bicubic", antialias=True)[0]
        thumb = F.interpolate(thumb[None], size=(size, size), mode="nearest")[0].clamp(0, 255).to(torch.uint8)
        crop = thumb[:, cy - r : cy + r, cx - r : cx + r]
        both = torch.cat([full, torch.full((3, 2 * r, max(2, r // 8)), 255, dtype=torch.uint8), crop], dim=2)
        axes[1, j].imshow(both.permute(1, 2, 0).numpy(), interpolation="nearest")
        axes[1, j].set_title("the ring: full resolution | from a 224 px thumbnail", fontsize=9)
        axes[1, j].axis("off")
    fig.suptitle(f"The study's task: four questions ({', '.join(QUESTIONS)}), answers in {{0, 1, 2, 3}}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


if __name__ == "__main__":
    print(samples())
