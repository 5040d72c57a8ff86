"""Pictures and the table for ``docs/study.md``.

    python benchmarks/study/figures.py --samples                      # docs/img/study_samples.png
    python benchmarks/study/figures.py --results benchmarks/study/results/steps600

``samples``: three images of the task (672, 1344, 2016 px) with their answers, and under each the
ring's glyph at full resolution next to what a 224 px thumbnail of the whole image keeps of it.
``--results``: the Markdown table of a results folder (mean +- standard deviation over seeds, per
question and overall) and its pictures: accuracy against tokens, ViT passes and training CPU time
(``docs/img/<name>_accuracy.png``) and the learning curves of ``--eval-every`` (``<name>_curves.png``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study.task import GLYPHS, QUESTIONS, make_sample  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def samples(path: Path = ROOT / "docs" / "img" / "study_samples.png", glyph_scale: int = 1) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = (672, 1344, 2016)
    fig, axes = plt.subplots(2, 3, figsize=(13, 8.2), gridspec_kw={"height_ratios": [3, 1.15]})
    for j, size in enumerate(sizes):
        image, answers = make_sample(size, seed=0, index=j, split="test", glyph_scale=glyph_scale)
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
    scaled = "" if glyph_scale == 1 else f", glyphs {glyph_scale} x larger"
    fig.suptitle(f"The study's task{scaled}: four questions ({', '.join(QUESTIONS)}), answers in {{0, 1, 2, 3}}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# --- The study's results: a table and pictures from the runs' result.json files -----------------------

#: Configurations that build the same front end as another (the same modules and options; only the draw
#: of the DEM's initial weights differs): the released INF-LLaVA front end is Table 4's "both", Table 5's
#: released fusion and Table 6's DCM + DEM. The study runs it once, as ``inf_llava``.
SAME_AS = {"dem_both": "inf_llava", "fusion_released": "inf_llava", "dcm_dem": "inf_llava"}


def load_results(root: Path) -> dict[str, list[dict]]:
    """The finished runs under ``root`` (``<config>-s<size>-seed<seed>/result.json``), by configuration."""
    import json

    runs: dict[str, list[dict]] = {}
    for path in sorted(Path(root).glob("*/result.json")):
        r = json.loads(path.read_text())
        runs.setdefault(r["config"], []).append(r)
    return runs


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and the sample standard deviation (0 for one value)."""
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return m, sd


def table(runs: dict[str, list[dict]], order=None) -> str:
    """A Markdown table: per configuration, accuracy per question and overall (mean +- sd over seeds)."""
    order = order or list(runs)
    head = "| configuration | tokens | ViT passes | seeds | " + " | ".join(QUESTIONS)
    head += " | overall | fine detail (glyph, match, link) | train CPU s / run | train wall s / run |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in order:
        rs = runs.get(name)
        if not rs:
            continue

        def cell(values):
            m, sd = _stats(values)
            return f"{m:.2f} +- {sd:.2f}" if len(values) > 1 else f"{m:.2f}"

        per_q = [cell([r["per_question"][q] for r in rs]) for q in QUESTIONS]
        fine = cell([sum(r["per_question"][q] for q in ("glyph", "match", "link")) / 3 for r in rs])
        cpu = _stats([r.get("train_cpu_s", float("nan")) for r in rs])[0]
        wall = _stats([r["train_s"] for r in rs])[0]
        lines.append(
            f"| `{name}` | {rs[0]['tokens']} | {rs[0]['vit_passes']} | {len(rs)} | "
            + " | ".join(per_q)
            + f" | {cell([r['accuracy'] for r in rs])} | {fine} | {cpu:.0f} | {wall:.0f} |"
        )
    return "\n".join(lines)


def accuracy_plot(runs: dict[str, list[dict]], path: Path, title: str = "") -> Path:
    """Accuracy (overall, the glyph, the fine-detail questions, the count) against tokens, ViT passes and CPU time.

    A marker: the mean over seeds; its bar: the spread (smallest to largest seed); small dots: the seeds;
    grey band: chance +- two standard deviations of a held-out score.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    xs = (
        ("tokens", "tokens the head reads", True),
        ("vit_passes", "ViT passes per image", True),
        ("train_cpu_s", "training CPU seconds per run", True),
    )
    ys = (
        ("overall", lambda r: r["accuracy"]),
        ("glyph", lambda r: r["per_question"]["glyph"]),
        (
            "fine detail (glyph, match, link)",
            lambda r: sum(r["per_question"][q] for q in ("glyph", "match", "link")) / 3,
        ),
        ("count", lambda r: r["per_question"]["count"]),
    )
    fig, axes = plt.subplots(len(ys), len(xs), figsize=(15, 4 * len(ys)), squeeze=False)
    cmap = plt.get_cmap("tab20")
    names = sorted(runs)
    for i, (yname, yf) in enumerate(ys):
        for j, (xkey, xlabel, logx) in enumerate(xs):
            ax = axes[i, j]
            for k, name in enumerate(names):
                rs = runs[name]
                # Many front ends share a token or pass count: spread them a little (log axis) to be seen.
                shift = 1.0 if xkey == "train_cpu_s" else 1.0 + 0.025 * (k - len(names) / 2)
                x = [r.get(xkey, float("nan")) * shift for r in rs]
                y = [yf(r) for r in rs]
                mx, my = sum(x) / len(x), sum(y) / len(y)
                color = cmap(k % 20)
                ax.errorbar(
                    [mx],
                    [my],
                    yerr=[[my - min(y)], [max(y) - my]],
                    fmt="o",
                    color=color,
                    capsize=3,
                )
                ax.scatter(x, y, s=8, color=color, alpha=0.6)
                ax.annotate(name, (mx, my), fontsize=6.5, xytext=(3, 3), textcoords="offset points")
            ax.axhline(0.25, color="grey", lw=0.8, ls="--")
            # Chance +- two standard deviations of a score on the held-out set.
            n = next(iter(runs.values()))[0]["eval_n"]
            band = 2 * (0.25 * 0.75 / n) ** 0.5
            ax.axhspan(0.25 - band, 0.25 + band, color="grey", alpha=0.12, lw=0)
            if yname.startswith("fine"):
                ax.set_ylim(0.15, 0.45)
            ax.set_xscale("log" if logx else "linear")
            ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            if xkey != "train_cpu_s":  # the counts themselves as ticks
                ax.set_xticks(sorted({r[xkey] for rs in runs.values() for r in rs}))
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"held-out accuracy: {yname}")
            ax.grid(alpha=0.3)
    fig.suptitle(
        title
        or "Held-out accuracy (mean over seeds, bar: smallest to largest seed; dashed: chance, band: +- 2 sd of it)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def curve_plot(runs: dict[str, list[dict]], path: Path, names=None) -> Path:
    """Learning curves (``--eval-every``): accuracy per question against training CPU seconds, per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in (names or sorted(runs)) if any("curve" in r for r in runs.get(n, []))]
    fig, axes = plt.subplots(1, len(QUESTIONS), figsize=(16, 4.2), sharey=True)
    cmap = plt.get_cmap("tab10")
    for k, name in enumerate(names):
        for r in runs[name]:
            c = r.get("curve")
            if not c:
                continue
            for j, q in enumerate(QUESTIONS):
                axes[j].plot(
                    [p["train_cpu_s"] for p in c],
                    [p["per_question"][q] for p in c],
                    "o-",
                    color=cmap(k % 10),
                    ms=3,
                    lw=1,
                    label=name if (j, r["seed"]) == (0, runs[name][0]["seed"]) else None,
                )
    for j, q in enumerate(QUESTIONS):
        axes[j].axhline(0.25, color="grey", lw=0.8, ls="--")
        axes[j].set_title(q)
        axes[j].set_xlabel("training CPU seconds")
        axes[j].grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy")
    axes[0].legend(fontsize=7)
    fig.suptitle("On the way: held-out accuracy every --eval-every steps (one line per seed; dashed: chance)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="The study's pictures and table (docs/study.md).")
    p.add_argument("--samples", action="store_true", help="redraw docs/img/study_samples.png")
    p.add_argument(
        "--glyph-scale", type=int, default=1, help="--samples with glyphs K x larger: docs/img/study_samples_g<K>.png"
    )
    p.add_argument("--results", type=Path, default=None, help="a results folder: print its table, draw its plots")
    p.add_argument("--name", default="study", help="the plots' file names: docs/img/<name>_accuracy.png, ...")
    a = p.parse_args(argv)
    if a.samples or a.results is None:
        tag = "" if a.glyph_scale == 1 else f"_g{a.glyph_scale}"
        print(samples(ROOT / "docs" / "img" / f"study_samples{tag}.png", a.glyph_scale))
    if a.results is not None:
        runs = load_results(a.results)
        print(table(runs, [n for n in ORDER if n in runs] + sorted(set(runs) - set(ORDER))))
        print(accuracy_plot(runs, ROOT / "docs" / "img" / f"{a.name}_accuracy.png"))
        print(curve_plot(runs, ROOT / "docs" / "img" / f"{a.name}_curves.png"))
    return 0


#: The table's order: the four 196-token front ends, Table 6, Table 4, Table 5, the other recipes.
ORDER = (
    "llava15",
    "s2",
    "inf_llava",
    "dcm_local",
    "dcm_global",
    "dcm_sum",
    "dem_global",
    "dem_local",
    "fusion_linear_concat",
    "fusion_add",
    "fusion_weighted_add",
    "fusion_multiply",
    "fusion_maxpool",
    "fusion_conv3x3",
    "llava_next",
    "llava_next_dcm",
    "internvl",
    "infimm_hd",
    "idefics3",
    "llava_onevision",
)


if __name__ == "__main__":
    sys.exit(main())
