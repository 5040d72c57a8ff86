"""The ``pixtral`` recipe against transformers (Pixtral-12B in LLaVA, and Mistral 3): tokens at the ``[IMG]``
positions equal to ``get_image_features`` from uint8 images, the ``[IMG_BREAK]`` / ``[IMG_END]`` positions
marked as slots, counts equal to the processor's text expansion, pixels equal to its ``pixel_values``, a
ragged batch in one packed pass without a dense mask equal to its images alone, bf16 within the tolerance
rule, and the refusals."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from _messages import FIX, raises_naming
from _models import random_images
from _tolerance import assert_close_to_reference

tf = pytest.importorskip("transformers")

from _pixtral_tiny import SETTINGS, build_pixtral  # noqa: E402
from transformers.models.pixtral import modeling_pixtral  # noqa: E402

import hrperc  # noqa: E402
from hrperc.backbones.pixtral import PixtralBackbone  # noqa: E402
from hrperc.recipes.pixtral import MergedProjector  # noqa: E402

FAMILIES = list(SETTINGS)
# a repeated size, thin ones, ones the longest edge shrinks, a tiny one, one transformers floors a row off
SIZES = [(150, 230), (97, 61), (150, 230), (40, 300), (300, 260), (20, 25), (1, 1), (600, 90), (19, 1149)]
TEXT = "[IMG] describe it"


@pytest.fixture(scope="module", params=FAMILIES)
def built(request):
    family = request.param
    model, proc = build_pixtral(family)
    patch, merge, edge = SETTINGS[family]
    enc = hrperc.create_encoder("pixtral", model.model.vision_tower, merge_size=merge, longest_edge=edge)
    return family, model, proc, enc


def _process(proc, images):
    return proc(
        images=images,
        text=[TEXT] * len(images),
        return_tensors="pt",
        padding=True,
        input_data_format="channels_first",
    )


def _ids(proc):
    return [proc.tokenizer.convert_tokens_to_ids(t) for t in ("[IMG]", "[IMG_BREAK]", "[IMG_END]")]


def _reference(model, batch, **kw):
    with torch.no_grad():
        return model.model.get_image_features(batch["pixel_values"], image_sizes=batch["image_sizes"], **kw)


def test_tokens_at_img_positions_equal_get_image_features_and_slots_are_break_and_end(built):
    family, model, proc, enc = built
    images = random_images(SIZES)
    batch = _process(proc, images)
    ref = _reference(model, batch).pooler_output
    with torch.no_grad():
        out = enc(images, project=model.model.multi_modal_projector)
    img, brk, end = _ids(proc)
    ids = batch["input_ids"]
    image_run = (ids == img) | (ids == brk) | (ids == end)
    assert out.num_tokens == image_run.sum(1).tolist() == [enc.num_tokens(s) for s in SIZES]
    err = 0.0
    for i, n in enumerate(out.num_tokens):
        run = ids[i][image_run[i]]  # the processor's [IMG] ... [IMG_BREAK] ... [IMG_END] for image i
        assert torch.equal(out.slot_mask[i, :n], (run == brk) | (run == end))
        assert not out.tokens[i][out.slot_mask[i]].any() and not out.tokens[i, n:].any()
        at_img = out.tokens[i, :n][run == img]
        assert at_img.shape == ref[i].shape
        err = max(err, (at_img - ref[i]).abs().max().item())
    assert err <= 1e-5, err  # per-image attention vs the model's dense block mask: ~1e-9 in fp32
    assert enc.token_width == enc.backbone.hidden_size * SETTINGS[family][1] ** 2


@pytest.mark.parametrize("layer", [-1, 1])
def test_without_project_tokens_are_the_towers_features_of_the_layer_merged_cell_by_cell(built, layer):
    family, model, proc, _ = built
    patch, merge, edge = SETTINGS[family]
    enc = hrperc.create_encoder("pixtral", model.model.vision_tower, merge_size=merge, longest_edge=edge, layer=layer)
    images = random_images(SIZES[:4])
    batch = _process(proc, images)
    with torch.no_grad():
        states = model.model.vision_tower(
            batch["pixel_values"], image_sizes=batch["image_sizes"], output_hidden_states=True
        ).hidden_states[layer][0]
        out = enc(images)
    grids = [(h // patch, w // patch) for h, w in batch["image_sizes"].tolist()]
    for i, part in enumerate(states.split([gh * gw for gh, gw in grids])):
        (gh, gw), d = grids[i], part.shape[-1]
        # a merged cell's token: its m x m patches (row-major inside the cell) concatenated on the channels
        cells = part.view(gh // merge, merge, gw // merge, merge, d).permute(0, 2, 1, 3, 4)
        n = out.num_tokens[i]
        mine = out.tokens[i, :n][~out.slot_mask[i, :n]]
        torch.testing.assert_close(mine, cells.reshape(-1, merge * merge * d), rtol=0, atol=1e-5)


def test_pixels_equal_the_processors_pixel_values_bit_for_bit(built):
    _, _, proc, enc = built
    images = random_images(SIZES)
    batch = _process(proc, images)
    for i, image in enumerate(images):
        plan = enc.plan(tuple(image.shape[-2:]))
        assert list(plan.resized) == batch["image_sizes"][i].tolist()
        view = enc.front_end.views(image[None], plan)[0, 0]
        assert view.dtype == torch.uint8  # resized in uint8, as the processor's torchvision backend
        h, w = plan.resized
        assert torch.equal(enc.backbone.normalize(view), batch["pixel_values"][i, :, :h, :w])


def test_a_ragged_batch_is_one_packed_pass_without_a_dense_mask_and_equals_each_image_alone(built, monkeypatch):
    family, model, _, enc = built
    tower = model.model.vision_tower
    images = random_images(SIZES, seed=1)
    calls, packed = [], []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, **kw):
        calls.append((tuple(q.shape), tuple(k.shape), attn_mask))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    def no_dense_mask(*args, **kwargs):
        raise AssertionError("transformers' dense (S x S) block mask was built")

    features_packed = enc.backbone.features_packed
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    monkeypatch.setattr(modeling_pixtral, "generate_block_attention_mask", no_dense_mask)
    monkeypatch.setattr(enc.backbone, "features_packed", lambda *a, **k: packed.append(1) or features_packed(*a, **k))
    hook = tower.register_forward_pre_hook(lambda *_: no_dense_mask())  # the tower's own forward builds it
    try:
        with torch.no_grad():
            out = enc(images)
    finally:
        hook.remove()
    assert packed == [1]  # every view of the batch, every size, in one call of the adapter
    p, m = tower.patch_size, SETTINGS[family][1]
    per_image = [(h // p) * (w // p) for h, w in (plan.resized for plan in out.plans)]
    layers = len(tower.transformer.layers)
    assert all(mask is None for *_, mask in calls)  # no mask at all: attention is per image by construction
    assert all(q[-2] == k[-2] and q[-2] in per_image for q, k, _ in calls)  # queries and keys of one image
    assert max(q[-2] for q, _, _ in calls) == max(per_image) < sum(per_image)
    assert sum(q[0] * q[-2] for q, _, _ in calls) == layers * sum(per_image)  # each image once per layer
    assert len(calls) == layers * len({plan.resized for plan in out.plans})  # one call per layer and view size
    monkeypatch.undo()
    with torch.no_grad():
        for i, image in enumerate(images):
            if SIZES.index(SIZES[i]) != i:
                continue  # a repeated size: the same computation as its first
            alone = enc(image)
            n = alone.num_tokens[0]
            torch.testing.assert_close(out.tokens[i, :n], alone.tokens[0], rtol=0, atol=1e-5)
    assert out.tokens.shape[-1] == tower.config.hidden_size * m * m


def _processor_sizes(seed, n, max_side, extra):
    rng = random.Random(seed)
    sizes = [(rng.randint(1, max_side), rng.randint(1, max_side)) for _ in range(n - len(extra))]
    return extra + sizes


def test_num_tokens_equals_the_processors_text_expansion_on_real_images(built):
    family, _, proc, enc = built
    patch, merge, edge = SETTINGS[family]
    unit = patch * merge
    extra = [(1, 1), (unit + 1, 1), (edge, 64), (2 * edge, 31), (31, 2 * edge), (edge + 1, edge - 1), (7, 3 * unit)]
    sizes = _processor_sizes(3, 30, 2 * edge, extra)
    images = [torch.zeros(3, h, w, dtype=torch.uint8) for h, w in sizes]
    batch = _process(proc, images)
    img, brk, end = _ids(proc)
    ids = batch["input_ids"]
    for i, size in enumerate(sizes):
        plan = enc.plan(size)
        rows, cols = plan.layout[0].shape
        counts = [int((ids[i] == t).sum()) for t in (img, brk, end)]
        assert counts == [rows * cols, rows - 1, 1], size
        assert sum(counts) == enc.num_tokens(size) == rows * (cols + 1)
        assert list(plan.resized) == batch["image_sizes"][i].tolist()


def test_readings_and_defaults(built):
    family, model, _, _ = built
    tower = model.model.vision_tower
    if family == "llava":  # Pixtral-12B's processor: longest side 1024, 16-px tokens
        enc = hrperc.create_encoder("pixtral", tower)
        official = hrperc.create_encoder("pixtral", tower, reading="mistral_common")
        assert (enc.front_end.longest_edge, enc.layer) == (1024, -1)
        assert (enc.num_tokens((19, 1149)), official.num_tokens((19, 1149))) == (65, 130)  # floor vs round
        assert enc.num_tokens((768, 1500)) == 33 * 65
    else:  # Mistral-Small-3.1's processor: longest side 1540, 28-px tokens
        enc = hrperc.create_encoder("pixtral", tower, merge_size=2)
        assert enc.front_end.longest_edge == 1540
        assert enc.num_tokens((2000, 3000)) == 37 * 56  # (1036, 1540) px


def test_bf16_within_the_tolerance_rule(built):
    family, model, proc, _ = built
    patch, merge, edge = SETTINGS[family]
    images = random_images(SIZES[1:5], seed=2)
    batch = _process(proc, images)
    low, ref64 = copy.deepcopy(model).to(torch.bfloat16), copy.deepcopy(model).double()
    ref_low = _reference(low, batch).pooler_output
    batch64 = {**batch, "pixel_values": batch["pixel_values"].double()}
    exact = _reference(ref64, batch64).pooler_output
    enc = hrperc.create_encoder("pixtral", low.model.vision_tower, merge_size=merge, longest_edge=edge)
    with torch.no_grad():
        out = enc(images, project=low.model.multi_modal_projector)
    assert out.tokens.dtype == torch.bfloat16
    for i, n in enumerate(out.num_tokens):
        mine = out.tokens[i, :n][~out.slot_mask[i, :n]]
        assert_close_to_reference(mine, ref_low[i], exact[i], torch.bfloat16, name=f"image {i}")


def test_gradient_checkpointing_keeps_outputs_and_gradients(built):
    family, model, _, _ = built
    patch, merge, edge = SETTINGS[family]
    tower = copy.deepcopy(model.model.vision_tower)
    images = random_images(SIZES[1:3], seed=3)
    grads = []
    for ckpt in (False, True):
        tower.zero_grad(set_to_none=True)
        enc = hrperc.create_encoder(
            "pixtral", tower, merge_size=merge, longest_edge=edge, train_backbone=True, grad_checkpointing=ckpt
        )
        out = enc(images)
        (out.tokens.square().sum()).backward()
        grads.append(([p.grad.clone() for p in tower.parameters()], out.tokens.detach()))
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=0)
    for a, b in zip(grads[0][0], grads[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_refusals_name_the_value_and_the_fix(built):
    family, model, _, enc = built
    tower = model.model.vision_tower
    name = "create_encoder('pixtral')"
    with raises_naming(TypeError, name, "Linear", "PixtralVisionModel", FIX):
        hrperc.create_encoder("pixtral", torch.nn.Linear(2, 2))
    with raises_naming(TypeError, name, type(model).__name__, ".model.vision_tower", FIX):
        hrperc.create_encoder("pixtral", model)
    for bad in (0, -2):
        with raises_naming(ValueError, name, f"merge_size={bad}", FIX):
            hrperc.create_encoder("pixtral", tower, merge_size=bad)
    with raises_naming(TypeError, name, "merge_size=1.5", FIX):
        hrperc.create_encoder("pixtral", tower, merge_size=1.5)
    p = tower.patch_size
    with raises_naming(ValueError, name, f"longest_edge={p}", str(2 * p), FIX):
        hrperc.create_encoder("pixtral", tower, merge_size=2, longest_edge=p)
    with raises_naming(ValueError, name, "longest_edge=0", FIX):
        hrperc.create_encoder("pixtral", tower, longest_edge=0)
    with raises_naming(ValueError, name, "reading='pil'", "'mistral_common'", FIX):
        hrperc.create_encoder("pixtral", tower, reading="pil")
    with raises_naming(ValueError, name, "layer=0", FIX):
        hrperc.create_encoder("pixtral", tower, layer=0)
    with raises_naming(ValueError, name, "layer=3", FIX):
        hrperc.create_encoder("pixtral", tower, layer=3)
    with raises_naming(TypeError, name, "layer=[-1, -2]", FIX):
        hrperc.create_encoder("pixtral", tower, layer=[-1, -2])
    with raises_naming(TypeError, name, "'patch_size'", "longest_edge", FIX):
        hrperc.create_encoder("pixtral", tower, patch_size=16)
    edge = SETTINGS[family][2]
    with raises_naming(ValueError, "HighResEncoder.num_tokens", "image_size=(1, 1000)", f"longest_edge={edge}", FIX):
        enc.num_tokens((1, 1000))  # the short side scales to 0.26 px: transformers fails, unclearly
    bb, p = enc.backbone, tower.patch_size
    with raises_naming(ValueError, "PixtralBackbone.features_packed", "stacks[0]", f"({p})", FIX):
        bb.features_packed([torch.zeros(1, 3, p + 1, p)])
    with raises_naming(TypeError, "PixtralBackbone.features_packed", "stacks[0]", "torch.uint8", FIX):
        bb.features_packed([torch.zeros(1, 3, p, p, dtype=torch.uint8)])
    with raises_naming(TypeError, "MergedProjector", "Linear", FIX):
        MergedProjector(torch.nn.Linear(2, 2), 2)
    if family == "mistral3":  # Mistral 3's projector merges 2 x 2: an encoder built for merge 1 cannot feed it
        flat = hrperc.create_encoder("pixtral", tower, longest_edge=edge)
        with raises_naming(ValueError, "merge_size=1", "spatial_merge_size", FIX):
            flat(random_images([(40, 40)]), project=model.model.multi_modal_projector)
    assert isinstance(enc.backbone, PixtralBackbone) and enc.recipe == "pixtral"
