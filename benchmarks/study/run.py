"""The front-end study's runner (``docs/study.md``): train from scratch, evaluate, write JSON.

For each configuration and seed: a tiny timm ``VisionTransformer`` (random weights, ``dynamic_img_size``),
the configuration's front end built through hrperc's own recipes and modules (``create_encoder``,
``HighResEncoder``, ``DualPerspectiveEnhancement`` options), and a small head (one cross-attention of four
learned question queries over the tokens) are trained end to end on the synthetic task
(``study/task.py``) for a budget of steps or wall clock on the CPU, then scored on a held-out set.
``--tower-steps N`` first pretrains the tower (stage 0, :func:`pretrain_tower`): N steps reading the
ring's glyph in full-resolution crops at any pixel offset, as a pretrained tower reads small shapes
anywhere; every configuration of a seed then runs on that same tower, frozen (as the paper's tower is in
both of its training stages): only the front end's own parts and the head train.

    python benchmarks/study/run.py --list
    python benchmarks/study/run.py --config inf_llava dcm_local --seeds 0 1 2 --steps 600
    python benchmarks/study/run.py --config inf_llava --seeds 0 --steps 600 --glyph-scale 3 --tower-steps 1000

Each run writes ``<out>/<config>-s<size>-seed<seed>/result.json``; while it trains it saves ``state.pt``
(model, optimizer, step, elapsed training time) every ``--save-every`` seconds, and a rerun of the same
command resumes from it (a finished run is skipped unless ``--force``). Training batches are a pure
function of ``(seed, step)``, so a resumed run sees the batches the uninterrupted one would have.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hrperc  # noqa: E402
from hrperc.modules.dem import default_heads  # noqa: E402
from hrperc.modules.fusion import FUSIONS  # noqa: E402
from hrperc.ops.reduce import reduce_tokens  # noqa: E402
from study.task import (  # noqa: E402
    NUM_ANSWERS,
    QUESTIONS,
    STUDY_SIZES,
    check_glyph_scale,
    check_seed,
    check_size,
    make_batch,
    ring_crops,
)

__all__ = [
    "CONFIGS",
    "Config",
    "Scale",
    "STUDY",
    "DEEP",
    "QUICK",
    "SCALES",
    "build_model",
    "pretrain_tower",
    "run_one",
    "main",
]

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Scale:
    """The tower and the task's scale: tiles of ``tile`` px (``patch`` px patches), ``size`` px images."""

    tile: int = 224
    patch: int = 16
    dim: int = 64
    depth: int = 4
    heads: int = 4
    size: int = 672
    batch: int = 8
    lr: float = 1e-3
    head_dim: int = 64


#: The study's scale: 3 x 3 tiles of 224 make the 672 px canvas the paper's 3 x 3 grid runs on. The tower
#: has 2 blocks: its 16 px patches, width and 196 tokens per tile are the deeper tower's, so every view,
#: token and ViT pass is the same, at ~0.55x the cost of a training step (docs/study.md, "Step costs").
STUDY = Scale(depth=2)
#: The tower of 4 blocks the preliminary pair ran with (docs/study.md): ``--scale deep``.
DEEP = Scale(depth=4)
#: Quick mode (the test suite): 96 px images, 32 px tiles -- the same front ends, a few seconds.
QUICK = Scale(tile=32, patch=8, dim=32, depth=2, heads=2, size=96, batch=16, lr=2e-3, head_dim=32)
#: ``--scale`` names (``--quick`` is ``--scale quick``).
SCALES = {"study": STUDY, "deep": DEEP, "quick": QUICK}


def tower(scale: Scale, seed: int) -> nn.Module:
    """The tiny ViT, drawn after ``torch.manual_seed(seed)``; it takes views of any whole number of patches."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=scale.tile,
        patch_size=scale.patch,
        embed_dim=scale.dim,
        depth=scale.depth,
        num_heads=scale.heads,
        num_classes=0,
        dynamic_img_size=True,
    )


def _dem(scale: Scale, **options) -> hrperc.DualPerspectiveEnhancement:
    return hrperc.DualPerspectiveEnhancement(scale.dim, default_heads(scale.dim), **options)


@dataclass(frozen=True)
class Config:
    """A named front end: ``recipe`` and ``options`` for ``create_encoder`` (``dem`` may be a callable of the
    scale, building the DEM for the tower's width), and ``pick``: for the DCM ablations, the one
    perspective (``"local"`` / ``"global"``) of ``combine="concat"``'s output the head reads, reduced as
    the DEM reduces (bilinear, to one tile's grid) and averaged with the thumbnail as ``combine="mean"`` does.
    """

    name: str
    group: str
    about: str
    recipe: str
    options: dict[str, Any] = field(default_factory=dict)
    pick: str | None = None

    def encoder(self, scale: Scale, seed: int, tower_state: dict | None = None) -> hrperc.HighResEncoder:
        # The DEM (an option) is drawn from the seed as well, before the tower reseeds: the weights are a
        # function of the seed alone, not of the runs an earlier process made.
        torch.manual_seed(seed)
        opts = {k: (v(scale) if callable(v) else v) for k, v in self.options.items()}
        vit = tower(scale, seed)
        if tower_state is not None:
            vit.load_state_dict(tower_state)
        # A pretrained tower is frozen, as the paper's (both stages); one drawn at random trains with the rest.
        return hrperc.create_encoder(self.recipe, vit, train_backbone=tower_state is None, **opts)


def _configs() -> dict[str, Config]:
    out: list[Config] = []

    def dem(**kw):
        return lambda scale: _dem(scale, **kw)

    # Table 4: DEM directions (the released DEM otherwise: released fusion, bilinear reduction).
    for d in ("both", "global", "local"):
        out.append(
            Config(
                f"dem_{d}",
                "DEM directions",
                f"inf_llava, DEM directions={d!r}",
                "inf_llava",
                {"dem": dem(directions=d)},
            )
        )
    # Table 5: fusion methods.
    for f in FUSIONS:
        out.append(
            Config(f"fusion_{f}", "DEM fusion", f"inf_llava, DEM fusion={f!r}", "inf_llava", {"dem": dem(fusion=f)})
        )
    # Table 6: the dual crops.
    concat = {"dem": None, "combine": "concat"}
    out += [
        Config(
            "dcm_local",
            "DCM",
            "local crops only (local map, reduced, mean with thumbnail)",
            "inf_llava",
            concat,
            "local",
        ),
        Config(
            "dcm_global",
            "DCM",
            "strided crops only (global map, reduced, mean with thumbnail)",
            "inf_llava",
            concat,
            "global",
        ),
        Config(
            "dcm_sum",
            "DCM",
            "plain sum of both maps: DEM directions='none', fusion='add'",
            "inf_llava",
            {"dem": dem(directions="none", fusion="add")},
        ),
        Config("dcm_dem", "DCM", "DCM + DEM (the released INF-LLaVA front end)", "inf_llava", {"dem": dem()}),
    ]
    # Recipes side by side.
    out += [
        Config("llava15", "recipes", "one view: the image resized to one tile (low-resolution baseline)", "llava15"),
        Config("llava_next", "recipes", "anyres: base view + tiles of the best pinpoint canvas", "llava_next"),
        Config(
            "llava_next_dcm",
            "recipes",
            "llava_next with dcm=True (strided views + DEM on the tiles' map)",
            "llava_next",
            {"dcm": True},
        ),
        Config(
            "inf_llava",
            "recipes",
            "the released INF-LLaVA front end (3 x 3 DCM + DEM, mean with thumbnail)",
            "inf_llava",
        ),
        Config("internvl", "recipes", "tiles (closest aspect) + thumbnail, pixel shuffle 0.5", "internvl"),
        Config(
            "s2",
            "recipes",
            "S2 multi-scale, scales (1, 2, 3): the 3 x 3 canvas, one tile's tokens",
            "s2",
            {"scales": (1, 2, 3)},
        ),
        Config("infimm_hd", "recipes", "global view + aspect-kept tiles", "infimm_hd"),
        Config("llava_onevision", "recipes", "anyres-max: base + tiles of 36 pinpoints", "llava_onevision"),
        Config(
            "idefics3", "recipes", "tiles of the longest edge at 4 tiles + the global image, pixel shuffle", "idefics3"
        ),
    ]
    return {c.name: c for c in out}


CONFIGS = _configs()


def check_config(name) -> Config:
    if not isinstance(name, str) or name not in CONFIGS:
        raise ValueError(f"config={name!r} is not a configuration; pass one of {', '.join(CONFIGS)} (run.py --list).")
    return CONFIGS[name]


class Head(nn.Module):
    """Four learned question queries attend over the tokens ``(B, T, D)`` -> logits ``(B, 4, NUM_ANSWERS)``.

    Each question reads its attention-pooled token next to the mean and the maximum over the tokens (a
    count over the whole image is a mean, which attention finds only slowly), batch-normalized: the
    differences between images are small next to what every image shares, and a head that must first
    learn that scale does not leave chance in a short run. A learned position per token index (a run has
    one image size, so index ``i`` is one place in the layout) lets the head tell the corners apart.
    """

    def __init__(self, width: int, tokens: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, dim)
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        self.queries = nn.Parameter(torch.randn(len(QUESTIONS), dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, 4 if dim % 4 == 0 else 1, batch_first=True)
        self.norm = nn.BatchNorm1d(3 * dim)
        self.out = nn.Sequential(nn.Linear(3 * dim, dim), nn.GELU(), nn.Linear(dim, NUM_ANSWERS))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, Q = tokens.shape[0], len(QUESTIONS)
        x = self.proj(tokens) + self.pos[:, : tokens.shape[1]]
        pooled, _ = self.attn(self.queries.expand(B, -1, -1), x, x, key_padding_mask=None if mask is None else ~mask)
        if mask is None:
            mean, top = x.mean(1), x.amax(1)
        else:
            keep = mask[..., None]
            mean = (x * keep).sum(1) / keep.sum(1)
            top = x.masked_fill(~keep, float("-inf")).amax(1)
        f = torch.cat([pooled, mean[:, None].expand(-1, Q, -1), top[:, None].expand(-1, Q, -1)], dim=-1)
        return self.out(self.norm(f.reshape(B * Q, -1)).reshape(B, Q, -1))


class StudyModel(nn.Module):
    """Encoder (tower + front end) and head; ``forward(images (B, 3, S, S) uint8)`` -> ``(B, 4, NUM_ANSWERS)``."""

    def __init__(self, config: Config, scale: Scale, seed: int, tower_state: dict | None = None) -> None:
        super().__init__()
        self.config, self.size = config, scale.size
        self.encoder = config.encoder(scale, seed, tower_state)
        width = self.encoder.token_width
        # The picked perspective is reduced to one tile's grid; otherwise the head reads every token.
        side = scale.tile // scale.patch
        self.head_tokens = side * side if config.pick else self.encoder.num_tokens((scale.size, scale.size))
        torch.manual_seed(seed + 1)
        self.head = Head(width, self.head_tokens, scale.head_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.encoder(images)
        if self.config.pick is None:
            return self.head(out.tokens, out.token_mask)
        return self.head(self._pick(out))

    def _pick(self, out) -> torch.Tensor:
        # One image size per run: every image of the batch has the same layout.
        seg = {s.source: s for s in out.layout[0]}
        B, D = out.tokens.shape[0], out.tokens.shape[-1]
        part, thumb = seg[self.config.pick], seg["thumbnail"]
        grid = out.tokens[:, part.start : part.stop].reshape(B, *part.shape, D)
        return (reduce_tokens(grid, thumb.shape, "bilinear") + out.tokens[:, thumb.start : thumb.stop]) / 2


def build_model(config: str, scale: Scale = STUDY, seed: int = 0, tower_state: dict | None = None) -> StudyModel:
    """The configuration's model; its tower drawn from ``seed`` and trained with the rest, or ``tower_state``
    (a pretrained tower's ``state_dict``, :func:`pretrain_tower`) loaded into it and frozen."""
    return StudyModel(check_config(config), scale, check_seed(seed), tower_state)


def _vit(model: nn.Module) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return next(m for m in model.modules() if isinstance(m, VisionTransformer))


def pretrain_tower(
    scale: Scale,
    seed: int,
    steps: int,
    *,
    glyph_scale: int = 1,
    task_seed: int = 0,
    cache: Path | None = None,
    place: str = "pixel",
    every: int | None = None,
    log=print,
) -> dict[str, Any]:
    """Stage 0: the tower of ``seed``, trained for ``steps`` steps (with a throwaway head, ``llava15``'s) on
    one question -- which glyph sits in the ring -- of ``scale.tile`` px full-resolution crops around the
    ring at any pixel offset (``task.ring_crops``, ``place="pixel"``; the glyph probe varies ``place``; the
    task's training stream, batches of ``scale.batch``, the runner's schedule), scored on 256 held-out crops
    at the end and, with ``every``, every that many steps on the way.

    Returns ``{"state": the tower's state_dict, "glyph": held-out accuracy, "steps", "cpu_s", "curve"}``; kept
    in ``cache`` (a file) when given, and read back from it by the next call with the same arguments.
    """
    meta = {"scale": scale.__dict__, "seed": seed, "steps": steps, "glyph_scale": glyph_scale, "task_seed": task_seed}
    if place != "pixel":
        meta["place"] = place
    if cache is not None and Path(cache).exists():
        saved = torch.load(cache, weights_only=False)
        if saved["meta"] == meta:
            return saved
    model = build_model("llava15", scale, seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=scale.lr, weight_decay=0.05)
    test_x, test_y = make_batch(range(256), scale.size, task_seed, "test", glyph_scale)
    test_crops = ring_crops(test_x, place, scale.tile, scale.patch)

    def glyph_accuracy() -> float:
        model.eval()
        with torch.no_grad():
            right = sum(
                (model(test_crops[i : i + 32])[:, 0].argmax(-1) == test_y[i : i + 32, 0]).sum().item()
                for i in range(0, 256, 32)
            )
        model.train()
        return right / 256

    c0, curve = time.process_time(), []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(scale, step / steps)
        images, answers = make_batch(
            range(step * scale.batch, (step + 1) * scale.batch), scale.size, task_seed, "train", glyph_scale
        )
        loss = F.cross_entropy(model(ring_crops(images, place, scale.tile, scale.patch))[:, 0], answers[:, 0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if every is not None and (step + 1) % every == 0 and step + 1 < steps:
            curve.append({"step": step + 1, "cpu_s": round(time.process_time() - c0), "glyph": glyph_accuracy()})
            log(f"[tower seed {seed}] stage 0 step {step + 1}/{steps}: glyph accuracy {curve[-1]['glyph']:.3f}")
        elif (step + 1) % 250 == 0:
            log(f"[tower seed {seed}] stage 0 step {step + 1}/{steps}  {time.process_time() - c0:.0f} s CPU")
    glyph = glyph_accuracy()
    curve.append({"step": steps, "cpu_s": round(time.process_time() - c0), "glyph": glyph})
    out = {
        "meta": meta,
        "state": {k: v.detach().clone() for k, v in _vit(model).state_dict().items()},
        "glyph": glyph,
        "steps": steps,
        "cpu_s": round(time.process_time() - c0, 2),
        "curve": curve,
    }
    log(f"[tower seed {seed}] stage 0: glyph accuracy {glyph:.3f} on 256 held-out crops after {steps} steps")
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, Path(cache).with_suffix(".tmp"))
        Path(cache).with_suffix(".tmp").replace(cache)
    return out


#: Held-out sets up to this many bytes are drawn once per process and kept (256 images at 672 px: 0.35 GB).
HELDOUT_CACHE_BYTES = 1.5e9


@functools.lru_cache(maxsize=1)
def _heldout(size: int, seed: int, n: int, glyph_scale: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return make_batch(range(n), size, seed, "test", glyph_scale)


def evaluate(model: StudyModel, scale: Scale, seed: int, n: int, glyph_scale: int = 1) -> dict[str, Any]:
    """Accuracy on the first ``n`` held-out images (the test split of the task's seed ``seed``).

    The held-out set is drawn once per process (when it fits :data:`HELDOUT_CACHE_BYTES`) and shared by
    every run of the process: it is a pure function of ``(size, seed, n)``.
    """
    model.eval()
    right = torch.zeros(len(QUESTIONS))
    held = _heldout(scale.size, seed, n, glyph_scale) if n * 3 * scale.size**2 <= HELDOUT_CACHE_BYTES else None
    with torch.no_grad():
        for start in range(0, n, scale.batch):
            stop = min(start + scale.batch, n)
            if held is None:
                images, answers = make_batch(range(start, stop), scale.size, seed, "test", glyph_scale)
            else:
                images, answers = held[0][start:stop], held[1][start:stop]
            right += (model(images).argmax(-1) == answers).float().sum(0)
    model.train()
    acc = right / n
    return {"accuracy": acc.mean().item(), "per_question": dict(zip(QUESTIONS, acc.tolist()))}


def _lr(scale: Scale, progress: float) -> float:
    # Warm up over the first 5 % of the budget, then a cosine to 0 at its end (progress: the share of the
    # steps done, or of the wall-clock budget spent when the budget is time).
    warm = min(1.0, progress / 0.05)
    return scale.lr * warm * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def run_one(
    config: str,
    seed: int = 0,
    *,
    scale: Scale = STUDY,
    minutes: float | None = None,
    steps: int | None = None,
    eval_n: int = 256,
    task_seed: int = 0,
    out: Path | None = DEFAULT_OUT,
    save_every: float = 60.0,
    force: bool = False,
    log=print,
    log_every: int = 25,
    eval_every: int | None = None,
    glyph_scale: int = 1,
    tower_steps: int = 0,
) -> dict[str, Any]:
    """Train ``config`` with ``seed`` for ``steps`` training steps or ``minutes`` of wall clock, then evaluate.

    The budget is ``steps`` (matched steps: the same for every configuration whatever the machine's load,
    the study's primary view) or ``minutes`` (wall clock: what a configuration achieves in a given time on
    this machine), or both (whichever ends first); the learning-rate schedule follows the budget. The
    result records the training's wall-clock and CPU seconds either way. ``seed`` draws the weights;
    ``task_seed`` the images (training stream and held-out set), the same for every configuration so that
    they are compared on the same data. ``out=None`` writes nothing. ``eval_every``: also score the
    held-out set every that many steps, on the way (``result["curve"]``: accuracy against steps, wall and
    CPU seconds; the learning rate is then still mid-schedule); evaluation time is not training time.
    """
    cfg, seed, task_seed = check_config(config), check_seed(seed), check_seed(task_seed, "task_seed")
    check_size(scale.size, name="scale.size")
    if minutes is None and steps is None:
        raise ValueError("no budget: pass steps=N (matched steps, --steps) or minutes=M (wall clock, --minutes).")
    if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not minutes > 0):
        raise ValueError(f"minutes={minutes!r} must be a number of minutes > 0 (the training budget per run).")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps={steps!r} must be a whole number >= 1 (or None: as many as the budget allows).")
    if isinstance(eval_n, bool) or not isinstance(eval_n, int) or eval_n < 1:
        raise ValueError(f"eval_n={eval_n!r} must be a whole number >= 1 (held-out images).")
    if eval_every is not None and (isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1):
        raise ValueError(f"eval_every={eval_every!r} must be a whole number of steps >= 1 (or None: at the end only).")
    budget = math.inf if minutes is None else 60.0 * minutes
    glyph_scale = check_glyph_scale(glyph_scale)
    if isinstance(tower_steps, bool) or not isinstance(tower_steps, int) or tower_steps < 0:
        raise ValueError(f"tower_steps={tower_steps!r} must be a whole number >= 0 (0: the tower from scratch).")
    # The glyph scale and the tower's pretraining join the name and the record only when they are not the
    # defaults (1, 0): the runs made before they existed keep their names and resume.
    tag = ("" if glyph_scale == 1 else f"-g{glyph_scale}") + ("" if tower_steps == 0 else f"-t{tower_steps}")
    run_dir = None if out is None else Path(out) / f"{cfg.name}-s{scale.size}{tag}-seed{seed}"
    meta = {"config": cfg.name, "seed": seed, "task_seed": task_seed, "scale": scale.__dict__, "minutes": minutes}
    if glyph_scale != 1:
        meta["glyph_scale"] = glyph_scale
    if tower_steps:
        meta["tower_steps"], meta["tower_frozen"] = tower_steps, True
    if steps is not None:
        meta["max_steps"] = steps
    if run_dir is not None and (run_dir / "result.json").exists() and not force:
        done = json.loads((run_dir / "result.json").read_text())
        if {k: done.get(k) for k in meta} != meta:
            raise ValueError(
                f"{run_dir / 'result.json'} holds another run ({ {k: done.get(k) for k in meta} }); pass --force to "
                f"replace it or another --out."
            )
        log(f"[{cfg.name} seed {seed}] done before: {run_dir / 'result.json'} (--force to rerun)")
        return done

    stage0 = None
    if tower_steps:
        cache = None if out is None else Path(out) / "towers" / f"tower-s{scale.size}{tag}-seed{seed}.pt"
        stage0 = pretrain_tower(
            scale, seed, tower_steps, glyph_scale=glyph_scale, task_seed=task_seed, cache=cache, log=log
        )
    model = build_model(cfg.name, scale, seed, None if stage0 is None else stage0["state"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=scale.lr, weight_decay=0.05)
    step, train_s, cpu_s, curve = 0, 0.0, 0.0, []
    state = None if run_dir is None else run_dir / "state.pt"
    if state is not None and state.exists():
        saved = torch.load(state, weights_only=False)
        if saved["meta"] != meta:
            raise ValueError(
                f"{state} was saved by another run ({saved['meta']}); remove it or pass another --out to start over."
            )
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        step, train_s, cpu_s, curve = saved["step"], saved["train_s"], saved.get("cpu_s", 0.0), saved.get("curve", [])
        log(f"[{cfg.name} seed {seed}] resumed at step {step} ({train_s:.0f} s trained)")

    def save() -> None:
        if state is not None:
            state.parent.mkdir(parents=True, exist_ok=True)
            tmp = state.with_suffix(".tmp")
            torch.save(
                {
                    "meta": meta,
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step,
                    "train_s": train_s,
                    "cpu_s": cpu_s,
                    "curve": curve,
                },
                tmp,
            )
            tmp.replace(state)  # atomic: an interrupted save leaves the previous state

    tokens = model.head_tokens  # what the head reads (the DCM ablations' one map, reduced; else the encoder's)
    passes = model.encoder.num_backbone_passes((scale.size, scale.size))
    log(f"[{cfg.name} seed {seed}] {cfg.about}: {tokens} tokens, {passes} ViT passes per {scale.size} px image")
    model.train()
    last_save, losses, last_loss = time.perf_counter(), [], float("nan")

    def point(scores: dict[str, Any]) -> dict[str, Any]:
        return {"step": step, "train_s": round(train_s, 2), "train_cpu_s": round(cpu_s, 2), **scores}

    while train_s < budget and (steps is None or step < steps):
        t0, c0 = time.perf_counter(), time.process_time()
        progress = max(train_s / budget, 0.0 if steps is None else step / steps)
        for g in opt.param_groups:
            g["lr"] = _lr(scale, progress)
        batch = range(step * scale.batch, (step + 1) * scale.batch)
        images, answers = make_batch(batch, scale.size, task_seed, "train", glyph_scale)
        logits = model(images)
        loss = F.cross_entropy(logits.reshape(-1, NUM_ANSWERS), answers.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        dt = time.perf_counter() - t0
        train_s += dt
        cpu_s += time.process_time() - c0
        losses.append(loss.item())
        if step == 1 and minutes is not None and dt > budget:
            raise ValueError(
                f"minutes={minutes} is shorter than one training step of {cfg.name} ({dt:.1f} s at "
                f"{scale.size} px, batch {scale.batch}); pass at least minutes={math.ceil(dt / 6) / 10}."
            )
        # On the way, before the checkpoint: a resumed run has the points up to the step it resumes from.
        if eval_every is not None and step % eval_every == 0 and train_s < budget and (steps is None or step < steps):
            curve.append(point(evaluate(model, scale, task_seed, eval_n, glyph_scale)))
            log(f"[{cfg.name} seed {seed}] step {step}: held-out accuracy {curve[-1]['accuracy']:.3f}")
        if time.perf_counter() - last_save >= save_every:
            save()
            last_save = time.perf_counter()
        if step % log_every == 0 or step == 1:
            of = f"/{steps}" if steps is not None else ""
            log(
                f"[{cfg.name} seed {seed}] step {step}{of}  {train_s:.0f} s wall, {cpu_s:.0f} s CPU  "
                f"loss {sum(losses) / len(losses):.3f}"
            )
            losses = []
        last_loss = loss.item()
    save()
    t0 = time.perf_counter()
    scores = evaluate(model, scale, task_seed, eval_n, glyph_scale)
    if eval_every is not None:
        curve.append(point(scores))
    result = {
        **meta,
        "group": cfg.group,
        "about": cfg.about,
        "tokens": tokens,
        "encoder_tokens": model.encoder.num_tokens((scale.size, scale.size)),
        "token_width": model.encoder.token_width,
        "vit_passes": passes,
        "steps": step,
        "last_loss": last_loss,
        "train_s": round(train_s, 2),
        "train_cpu_s": round(cpu_s, 2),
        "eval_s": round(time.perf_counter() - t0, 2),
        "eval_n": eval_n,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        **({} if stage0 is None else {"tower_glyph": stage0["glyph"], "tower_cpu_s": stage0["cpu_s"]}),
        **scores,
        **({"curve": curve} if eval_every is not None else {}),
        "chance": 1 / NUM_ANSWERS,
        "torch_threads": torch.get_num_threads(),
        # What else ran: the 1-minute load average at the end (a wall-clock time reads the machine too).
        "load_avg": round(os.getloadavg()[0], 2),
    }
    log(
        f"[{cfg.name} seed {seed}] held-out accuracy {scores['accuracy']:.3f} "
        f"({', '.join(f'{k} {v:.2f}' for k, v in scores['per_question'].items())}) after {step} steps"
    )
    if run_dir is not None:
        (run_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", nargs="+", default=[], help="configuration names (--list shows them)")
    p.add_argument("--list", action="store_true", help="list the configurations and exit")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="weight seeds, one run each")
    p.add_argument("--task-seed", type=int, default=0, help="the task's seed (training stream and held-out set)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (matched steps: the study's budget)")
    p.add_argument("--minutes", type=float, default=None, help="training wall-clock budget per run (minutes)")
    p.add_argument("--size", type=int, default=STUDY.size, help=f"image side, {STUDY_SIZES[0]}..{STUDY_SIZES[1]} px")
    p.add_argument(
        "--glyph-scale",
        type=int,
        default=1,
        help="the task's glyphs (5 x 5 bitmaps) drawn this many times larger, 1..3",
    )
    p.add_argument(
        "--tower-steps",
        type=int,
        default=0,
        help="stage 0: pretrain the tower this many steps on glyph crops first (0: from scratch)",
    )
    p.add_argument("--eval", type=int, default=256, help="held-out images")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the runs' folders go")
    p.add_argument("--save-every", type=float, default=60.0, help="seconds between checkpoints")
    p.add_argument("--eval-every", type=int, default=None, help="also score the held-out set every N steps")
    p.add_argument("--force", action="store_true", help="rerun finished runs")
    p.add_argument("--scale", choices=tuple(SCALES), default="study", help="the tower's scale (study: 2 blocks)")
    p.add_argument("--quick", action="store_true", help="quick mode: 96 px images, 32 px tiles (not the study)")
    a = p.parse_args(argv)
    if a.list:
        for c in CONFIGS.values():
            print(f"{c.name:18s} {c.group:15s} {c.about}")
        return 0
    try:
        if not a.config:
            raise ValueError("no --config given; pass one or more names (run.py --list).")
        for name in a.config:
            check_config(name)
        for s in a.seeds:
            check_seed(s)
        check_glyph_scale(a.glyph_scale)
        if a.threads < 1:
            raise ValueError(f"threads={a.threads} must be >= 1.")
        if a.quick or a.scale == "quick":
            scale = QUICK
        else:
            size = check_size(a.size, lo=STUDY_SIZES[0], hi=STUDY_SIZES[1])
            scale = dataclasses.replace(SCALES[a.scale], size=size)
        torch.set_num_threads(a.threads)
        results = []
        for name in a.config:
            for s in a.seeds:
                results.append(
                    run_one(
                        name,
                        s,
                        scale=scale,
                        minutes=a.minutes,
                        steps=a.steps,
                        eval_n=a.eval,
                        task_seed=a.task_seed,
                        out=a.out,
                        save_every=a.save_every,
                        eval_every=a.eval_every,
                        force=a.force,
                        glyph_scale=a.glyph_scale,
                        tower_steps=a.tower_steps,
                    )
                )
    except (ValueError, TypeError) as e:
        print(f"run.py: error: {e}", file=sys.stderr)
        return 2
    for r in results:
        print(
            f"{r['config']:18s} seed {r['seed']}  acc {r['accuracy']:.3f}  tokens {r['tokens']:5d}  "
            f"passes {r['vit_passes']:3d}  steps {r['steps']:5d}  train {r['train_s']:.0f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
