"""The ``idefics3`` / ``smolvlm`` recipes against transformers: the sizing functions equal to the image
processor's own over thousands of sizes, counts and the marker text equal to the processors' on real images,
pixels equal to ``pixel_values`` bit for bit, tokens equal to ``get_image_features``, a ragged batch in one
backbone pass equal to its images alone, ``dcm=True`` (same count, only the DEM trains), and the refusals."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from _messages import FIX, raises_naming
from _tolerance import assert_close_to_reference

tf = pytest.importorskip("transformers")
pytest.importorskip("num2words")  # SmolVLMProcessor needs it

from _idefics_tiny import SETTINGS, TEXT, build_idefics, images, processor  # noqa: E402
from transformers.models.idefics3.image_processing_idefics3 import get_resize_output_image_size  # noqa: E402

import hrperc  # noqa: E402
from hrperc.backbones.idefics import IdeficsBackbone  # noqa: E402
from hrperc.modules.frontend import make_layout  # noqa: E402
from hrperc.ops import idefics  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only wait on each other
FAMILIES = list(SETTINGS)
# a repeated size, thin ones, a tiny one, exact tile multiples, ones under one tile, a large one
SIZES = [(100, 150), (30, 40), (100, 150), (300, 90), (1, 1), (1, 333), (250, 2), (112, 168), (56, 56), (200, 260)]


@pytest.fixture(scope="module", params=FAMILIES)
def built(request):
    family = request.param
    model, proc = build_idefics(family)
    return family, model, proc, hrperc.create_encoder(family, model.model.vision_model)


def _process(proc, imgs, **kw):
    texts = [TEXT] * len(imgs)
    return proc(images=[[i] for i in imgs], text=texts, return_tensors="pt", padding=True, **kw)


# --- the sizing functions, against transformers' own ---------------------------------------------------------


class _Shape:
    """What the processor's size arithmetic reads of an image: its shape."""

    def __init__(self, h: int, w: int) -> None:
        self.shape = (1, 3, h, w)

    def size(self):
        return self.shape


def _sweep(seed: int, n: int, tile: int, edge: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    edges = [(1, 1), (1, 9000), (9000, 1), (2, 3), (tile, tile), (tile + 1, tile), (tile, tile - 1), (edge, edge)]
    edges += [(a * tile, b * tile) for a in range(1, 6) for b in range(1, 6)]  # exact tile multiples
    edges += [(a * tile + d, b * tile - d) for a in (1, 3) for b in (2, 4) for d in (1, 2)]
    edges += [(h, w) for h in (1, 2, 3, 7) for w in (tile - 1, tile, edge - 1, edge, edge + 1, 5 * edge)]  # thin
    edges += [(20000, 15000), (4097, 4096), (8191, 3), (edge // 2 + 1, edge)]  # huge, the 4096 bound, odd halves
    rand = [(rng.randint(1, 3 * edge), rng.randint(1, 3 * edge)) for _ in range(n)]
    return edges + rand + [(w, h) for h, w in edges]


@pytest.mark.parametrize(
    "tile,edge",
    [(364, 1456), (512, 2048), (384, 1536), (56, 224), (364, 700), (364, 5000), (364, 364), (128, 100)],
)
def test_sizing_functions_equal_the_image_processor_s_arithmetic(tile, edge):
    ip = tf.Idefics3ImageProcessor()
    ip.resize = lambda image, size, resample=None, **kw: (size.height, size.width)  # the size it would resize to
    for H, W in _sweep(tile + edge, 600, tile, edge):  # eight settings: ~6000 sizes in all
        first = get_resize_output_image_size(_Shape(H, W), edge)
        assert idefics.resize_longest_edge((H, W), edge) == first, (H, W)
        second = ip.resize_for_vision_encoder(_Shape(*first), tile)
        assert idefics.vision_encoder_size(first, tile) == second, (H, W)
        tiled = second[0] > tile or second[1] > tile  # split_images' rule
        grid = (math.ceil(second[0] / tile), math.ceil(second[1] / tile)) if tiled else (0, 0)
        assert idefics.tile_grid((H, W), longest_edge=edge, tile=tile) == grid, (H, W)
        assert idefics.tile_grid((H, W), longest_edge=edge, tile=tile, splitting=False) == (0, 0)


def test_num_tokens_of_the_plans_over_thousands_of_sizes(built):
    family, _, _, enc = built
    tile, patch, scale, edge = SETTINGS[family]
    seq = (tile // patch // scale) ** 2
    assert enc.front_end.image_seq_len == seq == idefics.image_seq_len(tile, patch, scale)
    for H, W in _sweep(7, 1000, tile, edge):
        rows, cols = idefics.tile_grid((H, W), longest_edge=edge, tile=tile)
        plan = enc.plan((H, W))
        assert enc.num_tokens((H, W)) == plan.num_tokens == (rows * cols + 1) * seq, (H, W)
        assert plan.views == rows * cols + 1 and plan.tiled == (rows > 0)
        assert [s.source for s in plan.layout] == [
            f"row_{r}_col_{c}" for r in range(1, rows + 1) for c in range(1, cols + 1)
        ] + ["global"]


def test_counts_and_the_marker_text_equal_the_processors_on_real_images(built):
    family, _, proc, enc = built
    tile, _, _, edge = SETTINGS[family]
    sizes = [(1, 1), (2, 2 * edge), (2 * edge, 2), (tile, tile), (tile + 1, tile), (2 * tile, 3 * tile)]
    sizes += [(edge, edge), (edge + 1, edge - 1), (edge // 2 + 1, edge), (17, 900), (640, 480), (35, 61)]
    rng = random.Random(5)
    sizes += [(rng.randint(1, edge), rng.randint(1, edge)) for _ in range(8)]
    imgs = [torch.zeros(3, h, w, dtype=torch.uint8) for h, w in sizes]
    batch = _process(proc, imgs)
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [enc.num_tokens(s) for s in sizes]
    # the text written from the encoder's layout, tokenized as the processor does, is the processor's
    texts = [TEXT.replace("<image>", idefics.layout_prompt(enc.plan(s).layout)) for s in sizes]
    mine = proc.tokenizer(texts, return_tensors="pt", padding=True)
    assert torch.equal(mine["input_ids"], batch["input_ids"])
    newline = proc.tokenizer.convert_tokens_to_ids("\n")
    assert (batch["input_ids"] == newline).any()  # the row breaks are tokens here: the check bites


def test_without_splitting_counts_text_and_tokens_equal_the_processors(built):
    family, model, proc, _ = built
    enc = hrperc.create_encoder(family, model.model.vision_model, do_image_splitting=False)
    imgs = images([(100, 150), (30, 400)], seed=4)
    batch = _process(proc, imgs, do_image_splitting=False)
    texts = [TEXT.replace("<image>", idefics.layout_prompt(enc.plan(tuple(i.shape[-2:])).layout)) for i in imgs]
    assert torch.equal(proc.tokenizer(texts, return_tensors="pt", padding=True)["input_ids"], batch["input_ids"])
    with torch.no_grad():
        ref = model.model.get_image_features(batch["pixel_values"], batch["pixel_attention_mask"]).pooler_output
        out = enc(imgs, project=model.model.connector.modality_projection)
    for i in range(len(imgs)):
        assert out.num_tokens[i] == ref[i].shape[0] == enc.front_end.image_seq_len
        torch.testing.assert_close(out.tokens[i, : out.num_tokens[i]], ref[i], rtol=0, atol=1e-5)


# --- pixels and tokens ------------------------------------------------------------------------------------------


def test_pixels_equal_the_processors_pixel_values_bit_for_bit(built):
    family, _, proc, enc = built
    imgs = images(SIZES, seed=2)
    batch = _process(proc, imgs)
    for i, image in enumerate(imgs):
        plan = enc.plan(tuple(image.shape[-2:]))
        views = enc.front_end.views(image[None], plan)[0]
        assert views.dtype == torch.uint8  # resized in uint8, LANCZOS, as the processor's torchvision backend
        v = views.shape[0]
        assert torch.equal(enc.backbone.normalize(views), batch["pixel_values"][i, :v])
        assert not batch["pixel_values"][i, v:].any()  # the processor pads with empty frames only


def test_tokens_equal_get_image_features_and_the_connector_s_shuffle(built):
    family, model, proc, enc = built
    imgs = images(SIZES)
    batch = _process(proc, imgs)
    with torch.no_grad():
        ref = model.model.get_image_features(batch["pixel_values"], batch["pixel_attention_mask"]).pooler_output
        out = enc(imgs, project=model.model.connector.modality_projection)
        raw = enc(imgs)  # no projection: the connector's pixel shuffle of the tower's last_hidden_state
        frames = batch["pixel_values"][1, : enc.plan(SIZES[1]).views]
        hidden = model.model.vision_model(frames).last_hidden_state
        shuffled = model.model.connector.pixel_shuffle(hidden, SETTINGS[family][2])
    assert out.num_tokens == [r.shape[0] for r in ref] == [enc.num_tokens(s) for s in SIZES]
    err = max((out.tokens[i, :n] - ref[i]).abs().max().item() for i, n in enumerate(out.num_tokens))
    assert err <= 1e-5, err  # the tower's own modules on the same pixels: 0.0 measured
    n = raw.num_tokens[1]
    torch.testing.assert_close(raw.tokens[1, :n], shuffled.flatten(0, 1), rtol=0, atol=1e-5)
    assert raw.tokens.shape[-1] == enc.token_width == 32 * SETTINGS[family][2] ** 2
    assert not out.tokens[~out.token_mask].any()  # the ragged padding stays zero


def test_bicubic_processors_are_reproduced_too(built):
    family, model, _, _ = built
    proc = processor(family, resample=3)
    enc = hrperc.create_encoder(family, model.model.vision_model, resample="bicubic")
    imgs = images([(100, 150), (30, 40)], seed=6)
    batch = _process(proc, imgs)
    for i, image in enumerate(imgs):
        views = enc.front_end.views(image[None], enc.plan(tuple(image.shape[-2:])))[0]
        assert torch.equal(enc.backbone.normalize(views), batch["pixel_values"][i, : views.shape[0]])


def test_bf16_tokens_are_within_the_tolerance_rule():
    model, proc = build_idefics("idefics3")
    imgs = images([(100, 150), (30, 40)], seed=7)
    batch = _process(proc, imgs)
    low = copy.deepcopy(model).to(torch.bfloat16)
    enc = hrperc.create_encoder("idefics3", low.model.vision_model)
    with torch.no_grad():
        out = enc(imgs, project=low.model.connector.modality_projection)
        ref_low = low.model.get_image_features(batch["pixel_values"].bfloat16(), batch["pixel_attention_mask"])
        ref64 = model.double().model.get_image_features(batch["pixel_values"].double(), batch["pixel_attention_mask"])
    for i, n in enumerate(out.num_tokens):
        assert out.tokens.dtype == torch.bfloat16
        assert_close_to_reference(
            out.tokens[i, :n], ref_low.pooler_output[i], ref64.pooler_output[i], torch.bfloat16, name=f"image {i}"
        )


def test_a_ragged_batch_is_one_backbone_pass_and_equals_each_image_alone(built, monkeypatch):
    _, _, _, enc = built
    imgs = images(SIZES, seed=3)
    calls = []
    features = enc.backbone.features
    monkeypatch.setattr(enc.backbone, "features", lambda x, *a, **k: calls.append(x.shape[0]) or features(x, *a, **k))
    with torch.no_grad():
        out = enc(imgs)
    views = [enc.plan(s).views for s in SIZES]
    assert calls == [sum(views)]  # every view of the batch (all of the tower's size) in one call
    monkeypatch.undo()
    with torch.no_grad():
        for i, image in enumerate(imgs):
            if SIZES.index(SIZES[i]) != i:
                continue
            alone = enc(image)
            torch.testing.assert_close(out.tokens[i, : out.num_tokens[i]], alone.tokens[0], rtol=0, atol=1e-6)


# --- the DCM+DEM upgrade ----------------------------------------------------------------------------------------


def test_dcm_keeps_the_count_and_trains_only_the_dem(built):
    family, model, _, plain = built
    tower = model.model.vision_model
    enc = hrperc.create_encoder(family, tower, dcm=True)
    assert plain.dem is None and enc.dem is not None and enc.dem.reduction == "none"
    for s in SIZES:
        assert enc.num_tokens(s) == plain.num_tokens(s), s
        assert enc.plan(s).layout == plain.plan(s).layout
        grid = enc.plan(s).grid
        assert enc.plan(s).views == plain.plan(s).views + grid[0] * grid[1]  # the strided views of the tiles
    sizes = [(100, 150), (30, 40)]  # a tiled image and a one-view one
    out = enc(images(sizes))
    assert out.num_tokens == [plain.num_tokens(s) for s in sizes] and out.tokens.requires_grad
    out.tokens[out.token_mask].square().mean().backward()
    grads = [p.grad for p in enc.dem.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in tower.parameters())  # the tower stays frozen
    with torch.no_grad():
        ref = plain(images(sizes))
    seq = plain.front_end.image_seq_len
    n = plain.num_tokens(sizes[0])
    # the DEM changes the tiles' tokens; the global image's (the last run) are the plain ones
    assert not torch.allclose(out.tokens[0, : n - seq].detach(), ref.tokens[0, : n - seq])
    torch.testing.assert_close(out.tokens[0, n - seq : n].detach(), ref.tokens[0, n - seq : n], rtol=0, atol=1e-6)


# --- defaults and refusals --------------------------------------------------------------------------------------


def _tower(family: str, side: int, patch: int):
    cls = tf.Idefics3VisionConfig if family == "idefics3" else tf.SmolVLMVisionConfig
    cfg = cls(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=side,
        patch_size=patch,
    )
    module = (
        tf.models.idefics3.modeling_idefics3.Idefics3VisionTransformer
        if family == "idefics3"
        else tf.models.smolvlm.modeling_smolvlm.SmolVLMVisionTransformer
    )
    return module(cfg).eval()


def test_defaults_are_the_released_checkpoints():
    idf = hrperc.create_encoder("idefics3", _tower("idefics3", 364, 14))
    fe = idf.front_end
    assert (fe.longest_edge, fe.scale_factor, fe.image_seq_len, fe.resample, idf.layer) == (1456, 2, 169, "lanczos", -1)
    assert idf.num_tokens((480, 640)) == 13 * 169 and idf.token_width == 4 * 32
    smol = hrperc.create_encoder("smolvlm", _tower("smolvlm", 512, 16))
    fe = smol.front_end
    assert (fe.longest_edge, fe.scale_factor, fe.image_seq_len) == (2048, 4, 64)
    assert smol.plan((716, 1272)).grid == (3, 4) and smol.num_tokens((716, 1272)) == 13 * 64  # 12 tiles, not 6
    assert smol.token_width == 16 * 32
    assert isinstance(smol.backbone, IdeficsBackbone)
    assert smol.recipe == "smolvlm" and smol.recipe_options == {}


def test_refusals_name_the_value_the_rule_and_the_fix():
    idefics_tower = _tower("idefics3", 364, 14)
    with raises_naming(ValueError, "scale_factor=4", "26x26", "[1, 2, 13, 26]", FIX):
        hrperc.create_encoder("smolvlm", idefics_tower)  # SmolVLM's scale on Idefics3's tower
    tower = _tower("idefics3", 56, 14)
    with raises_naming(ValueError, "scale_factor=3", FIX):
        hrperc.create_encoder("idefics3", tower, scale_factor=3)
    with raises_naming(ValueError, "longest_edge=0", FIX):
        hrperc.create_encoder("idefics3", tower, longest_edge=0)
    with raises_naming(TypeError, "longest_edge=224.0", FIX):
        hrperc.create_encoder("idefics3", tower, longest_edge=224.0)
    with raises_naming(ValueError, "resample='nearest'", "'lanczos'", FIX):
        hrperc.create_encoder("idefics3", tower, resample="nearest")
    with raises_naming(ValueError, "resample=[1]", "'lanczos'", FIX):
        hrperc.create_encoder("idefics3", tower, resample=[1])
    with raises_naming(TypeError, "do_image_splitting='no'", FIX):
        hrperc.create_encoder("smolvlm", tower, do_image_splitting="no")
    with raises_naming(TypeError, "max_image_size", "longest_edge", FIX):
        hrperc.create_encoder("idefics3", tower, max_image_size=56)
    model, _ = build_idefics("idefics3")
    with raises_naming(TypeError, "Idefics3ForConditionalGeneration", ".model.vision_model", FIX):
        hrperc.create_encoder("idefics3", model)  # the full model: its tower is named
    from timm.models.vision_transformer import VisionTransformer

    wide = VisionTransformer(img_size=(56, 28), patch_size=14, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    with raises_naming(ValueError, "56x28", "square", FIX):
        hrperc.create_encoder("idefics3", wide)
    with raises_naming(ValueError, "row_2_col_1", "global", FIX):
        idefics.layout_prompt(make_layout(("row_2_col_1", 4, (2, 2)), ("global", 4, (2, 2))))
    with raises_naming(ValueError, "rows=2", "cols=0", FIX):
        idefics.prompt(2, 0, 4)


def test_any_fixed_size_vit_runs_the_recipe():
    from _models import vit

    enc = hrperc.create_encoder("idefics3", vit(56))  # a timm ViT: 8 x 8 tokens, shuffled by 2
    out = enc(images([(100, 150)]))
    assert out.num_tokens == [enc.num_tokens((100, 150))] == [13 * 16] and out.tokens.shape[-1] == 4 * 32
