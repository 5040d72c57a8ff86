"""The ``minicpm_v`` recipe and :mod:`hrperc.ops.slices` against transformers' MiniCPM-V (``minicpmv4_6``; 4.7 has
the same image processor and tower): the slice grid, source and slice sizes and token counts equal to the image
processor's own methods over thousands of sizes and to the real processor's text; tokens equal to
``get_image_features`` (ragged batch = images alone, one packed tower pass, ``"4x"``, bf16 within the tolerance
rule); the markers' slots where the processor writes its markers; ``dcm=True``; the refusals."""

from __future__ import annotations

import math
import random

import pytest
import torch
from _messages import FIX, raises_naming

tf = pytest.importorskip("transformers")

from _minicpm_tiny import build_minicpm, processor  # noqa: E402

import hrperc  # noqa: E402
from hrperc.ops import slices  # noqa: E402
from hrperc.recipes.minicpm_v import MergerProjector, MiniCPMVBackbone  # noqa: E402

IP = tf.MiniCPMV4_6ImageProcessor()


def _sweep(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """Tiny, thin, huge, exact multiples of the slice side and of the merged patch, and random sizes."""
    rng = random.Random(seed)
    sizes = [(1, 1), (1, 5000), (5000, 1), (2, 3), (448, 448), (449, 448), (896, 448), (1344, 1344), (56, 56)]
    sizes += [(448 * a, 448 * b) for a in range(1, 5) for b in range(1, 5)]
    sizes += [(56 * a + d, 56 * b) for a in (1, 7, 8, 9, 20) for b in (1, 8, 16) for d in (-1, 0, 1)]
    sizes += [(rng.randint(1, 4000), rng.randint(1, 4000)) for _ in range(n)]
    sizes += [(rng.randint(1, 60), rng.randint(1, 6000)) for _ in range(n // 4)]  # thin
    return sizes


def _reference(size, *, scale=448, max_slices=9, patch=14, mode="16x", slice_mode=True):
    """The image processor's steps (its own methods), as ``_preprocess`` calls them."""
    grid = IP.get_sliced_grid(size, max_slices, scale) if slice_mode else None
    source = IP.find_best_resize(size, scale, patch, downsample_mode=mode, allow_upscale=grid is None)
    if grid is None:
        return source, None, None
    refine = IP.get_refine_size(size, grid, scale, patch, downsample_mode=mode, allow_upscale=True)
    return source, tuple(grid), tuple(refine)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"downsample_mode": "4x"},
        {"max_slice_nums": 4, "scale_resolution": 336},
        {"max_slice_nums": 1},
        {"slice_mode": False},
        {"patch_size": 16, "scale_resolution": 512},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults",
)
def test_slice_plan_equals_the_image_processor_over_thousands_of_sizes(options):
    ref_kw = {
        "scale": options.get("scale_resolution", 448),
        "max_slices": options.get("max_slice_nums", 9),
        "patch": options.get("patch_size", 14),
        "mode": options.get("downsample_mode", "16x"),
        "slice_mode": options.get("slice_mode", True),
    }
    divisor = 16 if ref_kw["mode"] == "16x" else 4
    p = ref_kw["patch"]
    sizes = _sweep(1500 if not options else 400)
    for size in sizes:
        plan = slices.slice_plan(size, **options)
        source, grid, refine = _reference(size, **ref_kw)
        assert (plan.source, plan.grid, plan.refine) == (tuple(source), grid, refine), size
        tokens = (source[0] // p) * (source[1] // p) // divisor
        if grid is not None:
            cut = (refine[0] // grid[0], refine[1] // grid[1])
            assert plan.slice == cut and cut[0] * grid[0] == refine[0] and cut[1] * grid[1] == refine[1], size
            tokens += grid[0] * grid[1] * ((cut[0] // p) * (cut[1] // p) // divisor)
        assert plan.image_tokens == tokens == slices.num_image_tokens(size, **options), size


def test_the_released_defaults_and_the_edge_rules():
    assert (slices.MINICPM_V_SCALE_RESOLUTION, slices.MINICPM_V_MAX_SLICE_NUMS) == (
        IP.scale_resolution,
        IP.max_slice_nums,
    )
    assert slices.MINICPM_V_PATCH_SIZE == IP.patch_size
    assert slices.slice_plan((448, 448)).grid is None  # exactly one slice's area: the source alone
    assert slices.slice_plan((449, 448)).grid == (2, 1)  # a pixel more: two slices, the taller split on a tie
    assert slices.slice_plan((4000, 4000)).grid == (3, 3)  # the budget caps the count
    assert slices.slice_plan((1, 1)).source == (448, 448)  # a tiny image is scaled up to the slice area
    plan = slices.slice_plan((500, 900))
    assert plan.num_tokens == plan.image_tokens + 2 + 2 * 2 + 0  # <image></image>, a pair per slice, one row


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        ({"downsample_mode": "8x"}, ("downsample_mode='8x'", "'16x'", "'4x'")),
        ({"max_slice_nums": 0}, ("max_slice_nums=0", ">= 1")),
        ({"scale_resolution": 44.8}, ("scale_resolution=44.8", "int")),
        ({"slice_mode": "yes"}, ("slice_mode='yes'",)),
    ],
)
def test_slice_plan_refuses_options_outside_the_processor_s_ranges(options, fragments):
    with raises_naming((ValueError, TypeError), *fragments, FIX):
        slices.slice_plan((500, 900), **options)
    with raises_naming((ValueError, TypeError), "image_size", "(0, 5)"):
        slices.slice_plan((0, 5))


# --- the processor's text on real images --------------------------------------------------------------------
# sliced 1 x 2, 2 x 1, 3 x 3 (capped), 1 x 3; the source alone; the area's edge; a pixel; thin both ways
TEXT_SIZES = [(500, 900), (900, 500), (1000, 1000), (300, 950), (40, 60), (448, 448), (449, 448), (1, 1), (30, 1400)]
TEXT_SIZES += [(1200, 60), (333, 777), (640, 480), (100, 2000), (2000, 100), (700, 300), (224, 224)]


def _expansion(proc, size):
    img = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ids = proc(images=[img], text=["<unk>"], return_tensors="pt", use_image_id=False)["input_ids"][0].tolist()
    return [proc.tokenizer.convert_ids_to_tokens(i) for i in ids]


@pytest.fixture(scope="module")
def released():
    """The real processor with the released options (448 px slices, up to 9)."""
    return processor("4_6")


@pytest.mark.parametrize("size", TEXT_SIZES)
def test_counts_equal_the_real_processor_s_text(released, size):
    tokens = _expansion(released, size)
    assert tokens.count("<unk>") == slices.num_image_tokens(size)
    assert len(tokens) == slices.num_tokens(size)  # every token the processor writes for the image
    plan = slices.slice_plan(size)
    rows = 0 if plan.grid is None else plan.grid[0]
    assert (tokens.count("<slice>"), tokens.count("\n")) == (plan.num_slices, max(rows - 1, 0))
    assert math.prod(plan.source_map) == tokens.index("</image>") - 1
    marks = {"image_start": "<image>", "image_end": "</image>", "slice_start": "<slice>", "slice_end": "</slice>"}
    written = [
        marks.get(what, "\n" if what == "row_end" else "<unk>") for what, n in slices.text_runs(plan) for _ in range(n)
    ]
    assert written == tokens  # the text, run by run


# --- the recipe: tokens, layout, batching, dcm, refusals -------------------------------------------------------------
#: the model runs' slice side: a quarter of the released 448 (the same slicing, packing and merging, 1/16 the
#: patches); the released options are the sizing tests' and the text tests' above
SCALE = dict(scale_resolution=112)
# sliced 1 x 2 and 2 x 1, the source alone (scaled up to 4 x 20 patches: a side that is a multiple of the tiny
# tower's 5 x 5 position table, where a position bucket off by one shows), one pixel over the slice area (2 x 1),
# a repeated size
TOKEN_SIZES = [(125, 225), (10, 60), (225, 125), (113, 112), (10, 60)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only wait on each other (and on a shared machine, on everything else)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built():
    model, proc = build_minicpm("4_6", **SCALE)
    return model, proc, hrperc.create_encoder("minicpm_v", model.model.vision_tower, **SCALE)


def _images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]


def _model_features(model, proc, image, **kw):
    """The model's image features of one image, as its processor prepares it: ``(image tokens, D_llm)``."""
    inputs = proc(images=[image], text=["<unk>"], return_tensors="pt", **kw)
    with torch.no_grad():
        mode = kw.get("downsample_mode")
        out = model.model.get_image_features(inputs["pixel_values"], inputs["target_sizes"], downsample_mode=mode)
    return torch.cat(out.pooler_output), inputs


def test_tokens_equal_the_model_s_image_features_and_a_ragged_batch_its_images_alone(built):
    model, proc, enc = built
    images = _images(TOKEN_SIZES)
    calls = []
    packed = enc.backbone.features_packed
    enc.backbone.features_packed = lambda stacks, layer=None, **kw: (
        calls.append(len(stacks)) or packed(stacks, layer, **kw)
    )
    try:
        with torch.no_grad():
            out = enc(images, project=model.model.merger)
    finally:
        del enc.backbone.features_packed
    shapes = {p.source for p in out.plans} | {p.slice for p in out.plans if p.slice is not None}
    assert calls == [len(shapes)]  # ONE tower pass, one stack per distinct view size
    assert [slices.slice_plan(s, **SCALE).grid for s in TOKEN_SIZES] == [(1, 2), None, (2, 1), (2, 1), None]
    # the processor on the same batch; the model's features come per view: the source, then the slices
    inputs = proc(images=images, text=["<unk>"] * len(images), return_tensors="pt", use_image_id=False)
    with torch.no_grad():
        views = model.model.get_image_features(inputs["pixel_values"], inputs["target_sizes"]).pooler_output
    starts = [0] + [sum(p.views for p in out.plans[: i + 1]) for i in range(len(images))]
    markers = {"image_start": "<image>", "image_end": "</image>", "slice_start": "<slice>"}
    markers.update(slice_end="</slice>", row_end="\n")
    for i, size in enumerate(TOKEN_SIZES):
        n = out.num_tokens[i]
        assert n == enc.num_tokens(size) == slices.num_tokens(size, **SCALE)
        ref = torch.cat(views[starts[i] : starts[i + 1]])
        torch.testing.assert_close(out.tokens[i, :n][~out.slot_mask[i, :n]], ref, rtol=0, atol=1e-6)  # fp32: 0.0
        assert not out.tokens[i, :n][out.slot_mask[i, :n]].any()  # the markers' slots stay zeros
        assert not out.tokens[i, n:].any()  # and the padding
        # the slots are where the processor writes its markers, each run its marker; the features its <unk>
        ids = inputs["input_ids"][i][inputs["attention_mask"][i].bool()]
        written = [proc.tokenizer.convert_ids_to_tokens(int(t)) for t in ids]
        assert [markers.get(s.source, "<unk>") for s in out.layout[i] for _ in range(s.length)] == written
    for i in (0, 1):  # sliced, and the source alone
        alone = enc([images[i]], project=model.model.merger).tokens[0]
        torch.testing.assert_close(out.tokens[i, : out.num_tokens[i]], alone, rtol=0, atol=1e-6)


def test_the_encoder_counts_what_the_sizing_functions_count(built):
    enc = hrperc.create_encoder("minicpm_v", built[0].model.vision_tower)  # the released options
    for size in _sweep(300, seed=1):
        plan = enc.plan(size)
        features = sum(s.length for s in plan.layout if s.source in ("source", "slice"))
        assert (plan.num_tokens, features) == (slices.num_tokens(size), slices.num_image_tokens(size)), size


def test_downsample_mode_4x_and_the_4_7_tower():
    model, proc = build_minicpm("4_7", seed=1)
    image, small = _images([(125, 225)])[0], SCALE  # 1 x 2 slices
    for mode in ("4x", "16x"):
        enc = hrperc.create_encoder("minicpm_v", model.model.vision_tower, downsample_mode=mode, **small)
        ref, _ = _model_features(model, proc, image, downsample_mode=mode, **small)
        with torch.no_grad():
            out = enc([image], project=model.model.merger)
        feats = out.tokens[0][~out.slot_mask[0]]
        assert out.plans[0].grid == (1, 2)
        assert feats.shape[0] == slices.num_image_tokens((125, 225), downsample_mode=mode, **small)
        torch.testing.assert_close(feats, ref, rtol=0, atol=1e-6)


def test_bf16_within_the_tolerance_rule(built):
    import copy

    from _tolerance import assert_close_to_reference

    model, proc, _ = built
    image, small = _images([(150, 250)])[0], {"scale_resolution": 112}  # 1 x 2 slices
    runs = {}
    for dtype in (torch.float64, torch.bfloat16):
        m = copy.deepcopy(model).to(dtype)
        inputs = proc(images=[image], text=["<unk>"], return_tensors="pt", **small)
        with torch.no_grad():
            ref = torch.cat(m.model.get_image_features(inputs["pixel_values"], inputs["target_sizes"]).pooler_output)
            out = hrperc.create_encoder("minicpm_v", m.model.vision_tower, **small)([image], project=m.model.merger)
        assert out.plans[0].grid == (1, 2)
        runs[dtype] = ref, out.tokens[0][~out.slot_mask[0]]
    assert_close_to_reference(runs[torch.bfloat16][1], runs[torch.bfloat16][0], runs[torch.float64][0])


def test_dcm_keeps_the_count_and_trains_only_the_dem(built):
    model, _, _ = built
    enc = hrperc.create_encoder("minicpm_v", model.model.vision_tower, dcm=True, **SCALE)
    sizes = [(125, 225), (10, 15)]  # sliced (the DEM runs) and not (the source alone)
    assert [enc.num_tokens(s) for s in sizes] == [slices.num_tokens(s, **SCALE) for s in sizes]
    assert enc.plan((125, 225)).views == 1 + 2 * 2  # the source, 2 slices, their 2 strided views
    out = enc(_images(sizes))
    assert out.num_tokens == [slices.num_tokens(s, **SCALE) for s in sizes]
    out.tokens.square().mean().backward()
    dem = list(enc.dem.parameters())
    assert dem and all(p.grad is not None for p in dem) and any(p.grad.abs().sum() > 0 for p in dem)
    assert all(p.grad is None and not p.requires_grad for p in model.model.vision_tower.parameters())
    trainable = {id(p) for p in enc.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in dem}
    plain = hrperc.create_encoder("minicpm_v", model.model.vision_tower, **SCALE)
    with torch.no_grad():  # the DEM changes the slices' tokens, never the source's
        a, b = enc(_images(sizes[:1])), plain(_images(sizes[:1]))
    src = a.layout[0][1]
    torch.testing.assert_close(a.tokens[0, src.start : src.stop], b.tokens[0, src.start : src.stop])
    assert not torch.allclose(a.tokens, b.tokens)


def test_refusals_name_the_value_and_the_fix(built):
    model, _, _ = built
    tower = model.model.vision_tower
    with raises_naming(TypeError, "tower=MiniCPMV4_6ForConditionalGeneration", ".model.vision_tower", FIX):
        hrperc.create_encoder("minicpm_v", model)
    with raises_naming(ValueError, "layer=-2", "layer=-1", FIX):
        hrperc.create_encoder("minicpm_v", tower, layer=-2)
    with raises_naming(TypeError, "['pinpoints']", "max_slice_nums", FIX):
        hrperc.create_encoder("minicpm_v", tower, pinpoints=[(448, 896)])
    with raises_naming(ValueError, "downsample_mode='2x'", "'16x'", FIX):
        hrperc.create_encoder("minicpm_v", tower, downsample_mode="2x")
    with raises_naming(ValueError, "max_slice_nums=0", FIX):
        hrperc.create_encoder("minicpm_v", tower, max_slice_nums=0)
    with raises_naming(TypeError, "merger=Linear", "model.model.merger", FIX):
        MergerProjector(torch.nn.Linear(2, 2))
    merger = model.model.merger
    try:  # two merge rounds
        merger.mlp.append(merger.mlp[0])
        with raises_naming(ValueError, "merger_times=2", "merger_times=1", FIX):
            MergerProjector(merger)
    finally:
        del merger.mlp[1]
    bb = MiniCPMVBackbone(tower)
    with raises_naming(ValueError, "stacks[0]", "(1, 3, 30, 56)", "28", FIX):
        bb.features_packed([torch.zeros(1, 3, 30, 56)])


def test_a_trained_tower_with_gradient_checkpointing_gives_the_same_tokens_and_grads(built):
    import copy

    model = copy.deepcopy(built[0])
    image, small = _images([(150, 250)]), {"scale_resolution": 112}
    grads = []
    for ckpt in (False, True):
        enc = hrperc.create_encoder(
            "minicpm_v", model.model.vision_tower, train_backbone=True, grad_checkpointing=ckpt, **small
        )
        model.zero_grad()
        out = enc(image)
        out.tokens.square().mean().backward()
        grads.append((out.tokens.detach(), [p.grad.clone() for p in model.model.vision_tower.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)


def test_a_tower_the_processor_does_not_count_for_is_refused():
    from transformers.models.minicpmv4_6.configuration_minicpmv4_6 import MiniCPMV4_6VisionConfig
    from transformers.models.minicpmv4_6.modeling_minicpmv4_6 import MiniCPMV4_6VisionModel

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=70)
    tower = MiniCPMV4_6VisionModel(MiniCPMV4_6VisionConfig(insert_layer_id=2, **vision))
    with raises_naming(ValueError, "insert_layer_id=2", "2 layers", "0 <= insert_layer_id < 2", FIX):
        hrperc.create_encoder("minicpm_v", tower)
