"""The native-resolution recipes qwen2_vl / qwen2_5_vl / qwen3_vl against transformers: tokens equal to
``get_image_features`` (Qwen3-VL's deepstack too) from uint8 images, counts equal to the processor's,
a ragged batch equal to its images alone, one packed tower call per batch, and the refusals."""

from __future__ import annotations

import pytest
import torch
from _messages import FIX, raises_naming
from _models import random_images

tf = pytest.importorskip("transformers")

from _qwen_tiny import build_qwen  # noqa: E402

import hrperc  # noqa: E402

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
# a repeated size, a thin one, one the budget shrinks, one it grows, a tiny one
SIZES = [(150, 230), (97, 61), (150, 230), (40, 300), (300, 260), (20, 25), (1, 1)]


@pytest.fixture(scope="module", params=FAMILIES)
def built(request):
    family = request.param
    model, ip = build_qwen(family)
    budget = dict(min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"])
    return family, model, ip, hrperc.create_encoder(family, model.model.visual, **budget)


def test_tokens_equal_get_image_features_from_uint8_images(built):
    family, model, ip, enc = built
    images = random_images(SIZES)
    batch = ip(images=images, return_tensors="pt")
    with torch.no_grad():
        out = enc(images)
        ref = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    counts = [int(t.prod()) // 4 for t in batch["image_grid_thw"]]
    assert out.num_tokens == counts == [enc.num_tokens(s) for s in SIZES]
    for i, n in enumerate(counts):  # same resize, the fused normalization, the same tower: bit for bit
        assert torch.equal(out.tokens[i, :n], ref.pooler_output[i])
        assert not out.tokens[i, n:].any() and int(out.token_mask[i].sum()) == n
    if family == "qwen3_vl":
        levels = ref.deepstack_features
        assert sorted(out.extras) == [f"deepstack.{k}" for k in range(len(levels))]
        for k, level in enumerate(levels):
            for i, n in enumerate(counts):
                assert torch.equal(out.extras[f"deepstack.{k}"][i, :n], level[i])
    else:
        assert out.extras == {}
    assert out.tokens.shape[-1] == enc.token_width == model.config.text_config.hidden_size


def test_a_ragged_batch_equals_each_image_alone_in_one_tower_call(built):
    family, model, _, enc = built
    images = random_images(SIZES, seed=1)
    calls = []
    hook = model.model.visual.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            out = enc(images)
    finally:
        hook.remove()
    assert len(calls) == 1  # every view of the batch, every size, in one packed call
    with torch.no_grad():
        for i, image in enumerate(images):
            alone = enc(image)
            n = alone.num_tokens[0]
            torch.testing.assert_close(out.tokens[i, :n], alone.tokens[0], rtol=0, atol=1e-5)


def test_counts_follow_the_budget_and_the_reading(built):
    family, model, ip, _ = built
    tower = model.model.visual
    f = 32 if family == "qwen3_vl" else 28
    enc = hrperc.create_encoder(family, tower)  # the released checkpoints' budget
    lo = 65536 if family == "qwen3_vl" else 3136
    assert enc.num_tokens((1, 1)) == lo // f**2
    if family == "qwen2_vl":
        official = hrperc.create_encoder(family, tower, reading="qwen-vl-utils")
        assert (enc.num_tokens((10, 500)), official.num_tokens((10, 500))) == (15, 18)


def test_refusals_name_the_value_and_the_fix(built):
    family, model, _, _ = built
    tower = model.model.visual
    other = "qwen3_vl" if family != "qwen3_vl" else "qwen2_vl"
    with raises_naming(ValueError, f"create_encoder('{other}')", family, FIX):
        hrperc.create_encoder(other, tower)
    with raises_naming(TypeError, f"create_encoder('{family}')", "Linear", FIX):
        hrperc.create_encoder(family, torch.nn.Linear(2, 2))
    with raises_naming(ValueError, "layer=-2", FIX):
        hrperc.create_encoder(family, tower, layer=-2)
    with raises_naming(ValueError, "min_pixels", FIX):
        hrperc.create_encoder(family, tower, min_pixels=10**6, max_pixels=10**5)
    with raises_naming(ValueError, "reading", FIX):
        hrperc.create_encoder(family, tower, reading="pil")
    with raises_naming(ValueError, "200", FIX):
        hrperc.create_encoder(family, tower).num_tokens((2, 500))
