"""The front-end study's quick mode (``docs/study.md``): the pipeline runs, resumes, refuses bad input, learns.

Tiny images (96 px, 32 px tiles: ``study.run.QUICK``), one thread; not the study's numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from study import run, task  # noqa: E402


def _quiet(*_):
    pass


def test_task_is_a_pure_function_of_seed_split_index():
    a, ya = task.make_sample(96, seed=3, index=5)
    b, yb = task.make_sample(96, seed=3, index=5)
    c, _ = task.make_sample(96, seed=3, index=5, split="test")
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(a, c)  # the held-out split is another stream
    assert a.dtype == torch.uint8 and a.shape == (3, 96, 96)
    assert ((ya >= 0) & (ya < task.NUM_ANSWERS)).all()


def test_batch_holds_the_samples_pixels():
    # make_batch writes each image once into the batch; the pixels are make_sample's.
    images, answers = task.make_batch([7, 2, 9], size=96, seed=1, split="test")
    for k, i in enumerate([7, 2, 9]):
        image, ans = task.make_sample(96, seed=1, index=i, split="test")
        assert torch.equal(images[k], image) and torch.equal(answers[k], ans)


def test_task_answers_cover_the_closed_set():
    _, answers = task.make_batch(range(64), size=96)
    for q in range(len(task.QUESTIONS)):
        assert set(answers[:, q].tolist()) == set(range(task.NUM_ANSWERS)), task.QUESTIONS[q]


def test_glyphs_have_nearly_the_same_ink():
    # A blurred glyph (a thumbnail's) must say nothing: the four kinds differ in shape, not in ink.
    image, _ = task.make_sample(672, seed=0, index=0)
    assert image.shape == (3, 672, 672)
    glyphs = torch.from_numpy(task._BITMAPS).float()
    assert (glyphs.sum((1, 2)) - 8.5).abs().max() <= 0.5  # nearly the same ink: no cue in a blurred dot


def test_glyph_scale_draws_the_same_scene_with_larger_glyphs():
    # Same draw (answers, everything but the glyphs); each glyph's 5 x 5 bitmap pixels K x K times the ink.
    one, y1 = task.make_sample(672, seed=2, index=4, glyph_scale=1)
    three, y3 = task.make_sample(672, seed=2, index=4, glyph_scale=3)
    assert torch.equal(y1, y3)
    ink = lambda image: int((image == 0).all(0).sum())  # noqa: E731 -- black is the glyphs' ink only
    assert ink(one) > 0 and ink(three) == 9 * ink(one)
    assert torch.equal(one[:, :40], three[:, :40])  # the top strip holds no glyph: the same pixels


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"config": "llava15", "steps": 1, "glyph_scale": 4}, "glyph_scale=4"),
        ({"config": "llava15", "steps": 1, "glyph_scale": 0}, "glyph_scale=0"),
        ({"config": "llava15", "steps": 1, "tower_steps": -1}, "tower_steps=-1"),
        ({"config": "no_such_front_end"}, "no_such_front_end"),
        ({"config": "inf_llava", "seed": -1}, "seed=-1"),
        ({"config": "inf_llava", "minutes": 0}, "minutes=0"),
        ({"config": "inf_llava", "steps": 0}, "steps=0"),
        ({"config": "inf_llava"}, "no budget"),
    ],
)
def test_run_one_refuses_bad_input_naming_it(kwargs, name):
    with pytest.raises(ValueError, match=name):
        run.run_one(scale=run.QUICK, out=None, log=_quiet, **kwargs)


def test_budget_too_small_for_one_step_is_refused(one_thread):
    with pytest.raises(ValueError, match=r"minutes=1e-06 is shorter than one training step"):
        run.run_one("llava15", 0, scale=run.QUICK, minutes=1e-6, out=None, log=_quiet)


@pytest.mark.parametrize(
    "argv, name",
    [
        (["--config", "nope"], "'nope'"),
        (["--config", "inf_llava", "--size", "100"], "size=100"),
        (["--config", "inf_llava", "--size", "4032"], "size=4032"),
        (["--config", "inf_llava", "--seeds", "-3"], "seed=-3"),
        (["--config", "inf_llava", "--glyph-scale", "5"], "glyph_scale=5"),
    ],
)
def test_cli_errors_are_one_line_naming_the_value(argv, name, capsys):
    assert run.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and name in err and err.startswith("run.py: error:")


def test_every_configuration_builds_and_runs_one_image(one_thread):
    # Each named configuration is a working front end at the quick scale (the library's options accept it).
    images, _ = task.make_batch(range(1), size=run.QUICK.size)
    for name in run.CONFIGS:
        model = run.build_model(name, run.QUICK, 0)
        with torch.no_grad():
            assert model(images).shape == (1, len(task.QUESTIONS), task.NUM_ANSWERS), name


def test_interrupted_run_resumes_where_it_stopped(tmp_path, one_thread):
    kw = dict(scale=run.QUICK, minutes=60.0, eval_n=8, save_every=0.0, log=_quiet, log_every=1, eval_every=1)
    whole = run.run_one("dcm_local", 0, steps=3, out=tmp_path / "a", **kw)

    class Stop(Exception):
        pass

    def stop_after_two(msg):
        if "step 2/" in msg:
            raise Stop

    first = dict(kw, log=stop_after_two)
    with pytest.raises(Stop):
        run.run_one("dcm_local", 0, steps=3, out=tmp_path / "b", **first)
    # The log line of step 2 comes after its checkpoint: the rerun starts at step 2 and ends where `whole` did.
    seen = []
    resumed = run.run_one("dcm_local", 0, steps=3, out=tmp_path / "b", **dict(kw, log=seen.append))
    assert any("resumed at step 2" in m for m in seen)
    assert resumed["steps"] == whole["steps"] == 3
    # The learning curve (a held-out score after every step here) survives the interruption.
    assert [c["step"] for c in resumed["curve"]] == [1, 2, 3]
    assert [c["per_question"] for c in resumed["curve"]] == [c["per_question"] for c in whole["curve"]]
    assert resumed["train_cpu_s"] > 0 and resumed["train_s"] > 0  # wall and CPU seconds, summed over the resume
    assert resumed["last_loss"] == whole["last_loss"]
    assert resumed["per_question"] == whole["per_question"]
    again = run.run_one("dcm_local", 0, steps=3, out=tmp_path / "b", **kw)  # finished: read back, not rerun
    assert again == resumed
    with pytest.raises(ValueError, match="holds another run"):  # a finished run of other settings is not reused
        run.run_one("dcm_local", 0, steps=4, out=tmp_path / "b", **kw)


@pytest.mark.parametrize("place", ["centred", "patch", "pixel"])
def test_ring_crops_hold_the_whole_ring(place):
    # The crop is of the full-resolution image, around the ring: the whole red ring is in view.
    images, _ = task.make_batch(range(6), size=672, glyph_scale=3)
    crops = task.ring_crops(images, place)
    assert crops.shape == (6, 3, 224, 224) and crops.dtype == torch.uint8
    red = lambda x: (x[:, 0] > 200) & (x[:, 1] < 60) & (x[:, 2] < 60)  # noqa: E731
    assert torch.equal(red(crops).sum((-2, -1)), red(images).sum((-2, -1)))
    if place == "centred":
        ys, xs = red(crops)[0].nonzero(as_tuple=True)
        assert abs(ys.float().mean() - 112) <= 1 and abs(xs.float().mean() - 112) <= 1


def test_stage0_tower_is_kept_and_every_configuration_starts_from_it(tmp_path, one_thread):
    cache = tmp_path / "tower.pt"
    first = run.pretrain_tower(run.QUICK, 1, 3, glyph_scale=2, cache=cache, log=_quiet)
    again = run.pretrain_tower(run.QUICK, 1, 3, glyph_scale=2, cache=cache, log=_quiet)  # read back
    assert all(torch.equal(first["state"][k], again["state"][k]) for k in first["state"])
    drawn = run._vit(run.build_model("llava15", run.QUICK, 1)).state_dict()
    assert any(not torch.equal(first["state"][k], drawn[k]) for k in drawn)  # stage 0 trained it
    for name in ("llava15", "inf_llava", "dcm_local"):
        vit = run._vit(run.build_model(name, run.QUICK, 1, first["state"]))
        assert all(torch.equal(v, first["state"][k]) for k, v in vit.state_dict().items()), name
        assert not any(p.requires_grad for p in vit.parameters()), name  # frozen, as the paper's tower
    r = run.run_one(
        "inf_llava", 1, scale=run.QUICK, steps=1, eval_n=8, glyph_scale=2, tower_steps=3, out=tmp_path, log=_quiet
    )
    assert r["tower_steps"] == 3 and r["glyph_scale"] == 2 and 0 <= r["tower_glyph"] <= 1
    assert (tmp_path / "inf_llava-s96-g2-t3-seed1" / "result.json").exists()


def test_task_is_learnable_in_a_short_run(one_thread):
    # s2 with scales (1, 2, 3) sees the 96 px image at full resolution (its 3 x 3 scale) and the whole of it.
    # After 80 steps of 16 images the count over the whole image is well above chance on 128 held-out
    # images (0.46 here; chance 0.25, one standard deviation of chance ~0.04); the fine-detail questions
    # need the study's budget, not a test's.
    r = run.run_one("s2", 0, scale=run.QUICK, steps=80, minutes=60.0, eval_n=128, out=None, log=_quiet)
    assert r["steps"] == 80 and r["eval_n"] == 128
    assert r["per_question"]["count"] > r["chance"] + 0.12, r["per_question"]


def test_docs_list_every_configuration():
    # docs/study.md's configuration table names each configuration the runner has, and no other.
    import re

    doc = (Path(__file__).resolve().parents[1] / "docs" / "study.md").read_text()
    table = doc[doc.index("| group | names | through |") : doc.index("Tokens and ViT passes per 672 px image")]
    rows = [r for r in table.splitlines()[2:] if r.startswith("|")]
    names = {n for row in rows for n in re.findall(r"`([a-z0-9_]+)`", row.split("|")[2])}
    assert names == set(run.CONFIGS)
