"""The recipes against their references: token counts and grids over thousands of image sizes (transformers'
processors), S2 against a transcription of the S2-wrapper, InfiMM-HD by its properties, and the batched
pass of every recipe (ragged batches equal per-image calls, one backbone pass, chunked by ``max_batch``)."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from _models import vit as tiny_vit
from einops import rearrange

import hrperc
from hrperc.ops import preprocess as pp
from hrperc.ops.anyres import LLAVA_NEXT_PINPOINTS, ONEVISION_PINPOINTS

transformers = pytest.importorskip("transformers")
timm_vit = pytest.importorskip("timm.models.vision_transformer")
from transformers.image_processing_utils import select_best_resolution  # noqa: E402
from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas  # noqa: E402
from transformers.models.llava_next.modeling_llava_next import unpad_image  # noqa: E402
from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image as ov_unpad_image  # noqa: E402

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# --- tiny backbones of the real tile / patch sizes (counts need no pixels) -------------------------------
def _clip(image_size=336, patch_size=14, hidden=16):
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    return transformers.CLIPVisionModel(cfg).eval()


def _siglip(image_size=384, patch_size=14):
    cfg = transformers.SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    return transformers.SiglipVisionModel(cfg).eval()


def _internvl(image_size=448, patch_size=14):
    from transformers.models.internvl import modeling_internvl

    cfg = transformers.InternVLVisionConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=image_size,
        patch_size=patch_size,
    )
    return modeling_internvl.InternVLVisionModel(cfg).eval()


def _sizes(tile, n=2000, seed=0, ties=()):
    """A seeded log-uniform sample (1..4000 px a side) plus sizes under one tile, extreme aspect ratios
    (1:20 .. 1:200 and back), the grid rules' tie cases and sizes above the largest pinpoint."""
    rng = random.Random(seed)
    out = set()
    while len(out) < n:
        out.add(tuple(max(1, round(math.exp(rng.uniform(0.0, math.log(4000))))) for _ in range(2)))
    out |= {(h, w) for h in range(1, tile, 23) for w in range(1, tile, 29)}  # under one tile on both sides
    for r in (20, 37, 50, 200):
        out |= {(s, r * s) for s in range(1, 120, 13)} | {(r * s, s) for s in range(1, 120, 13)}
    out |= {(1, 1), (1, 4000), (4000, 1), (1, 2), (2, 1), (tile, tile), (tile - 1, tile + 1), (tile + 1, tile)}
    out |= {(5000, 3000), (3000, 5000), (6000, 6000), (8000, 500), (500, 8000), (6 * tile + 1, 6 * tile + 1)}
    out |= set(ties)
    return sorted(out)


def _ratio_ties(tile):
    """Images whose aspect ratio is exactly a grid's ratio, or exactly between two grids' ratios: 1, 2, 1/2,
    3/2, ... at many scales (InternVL's rule then breaks the tie by area)."""
    out = set()
    for a, b in [(1, 1), (1, 2), (2, 1), (2, 3), (3, 2), (1, 3), (3, 1), (3, 4), (4, 3), (1, 4), (4, 1), (1, 12)]:
        for k in (1, 7, 50, 100, 150, 224, 300, tile, 2 * tile, 1000):
            out.add((a * k, b * k))
    return out


def _pinpoint_ties(pinpoints):
    """The pinpoints themselves and their halves and doubles (several canvases keep every pixel)."""
    out = set()
    for h, w in pinpoints:
        out |= {(h, w), (h // 2, w // 2), (2 * h, 2 * w), (h - 1, w), (h, w + 1)}
    return out


# --- 1. token counts and grids against the processors -----------------------------------------------------
def test_llava15_count_equals_the_llava_processor_for_every_size():
    from transformers import LlavaImageProcessor, LlavaProcessor

    enc = hrperc.create_encoder("llava15", _clip())
    proc = object.__new__(LlavaProcessor)  # the counting code only, without a tokenizer
    proc.patch_size, proc.num_additional_image_tokens, proc.vision_feature_select_strategy = 14, 1, "default"
    proc.image_token = "@"
    ip = LlavaImageProcessor(do_pad=True, size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    # what the processor puts out for a few real images: always one 336 x 336 tile
    shapes = set()
    for h, w in [(1, 1), (20, 400), (400, 20), (335, 337), (700, 500)]:
        pixel_values = ip(torch.zeros(3, h, w, dtype=torch.uint8), return_tensors="pt")["pixel_values"]
        shapes.add(tuple(pixel_values.shape))
        n = len(proc.replace_image_token({"pixel_values": pixel_values}, 0))
        assert enc.num_tokens((h, w)) == n == 576, (h, w)
    assert shapes == {(1, 3, 336, 336)}
    reference = len(proc.replace_image_token({"pixel_values": torch.zeros(1, 3, 336, 336)}, 0))
    sizes = _sizes(336, ties=_pinpoint_ties(LLAVA_NEXT_PINPOINTS))
    assert len(sizes) >= 2000
    for size in sizes:
        assert enc.num_tokens(size) == reference, size
        assert enc.view_plan(size).views == enc.num_backbone_passes(size) == 1


def _next_processor():
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    proc = object.__new__(LlavaNextProcessor)
    proc.image_processor = LlavaNextImageProcessor()
    proc.patch_size, proc.num_additional_image_tokens, proc.vision_feature_select_strategy = 14, 1, "default"
    assert proc.image_processor.image_grid_pinpoints == [list(p) for p in LLAVA_NEXT_PINPOINTS]
    return proc


def _onevision_processor():
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor

    proc = object.__new__(LlavaOnevisionProcessor)
    proc.image_processor = LlavaOnevisionImageProcessor()
    proc.num_image_tokens, proc.vision_aspect_ratio, proc.vision_feature_select_strategy = 729, "anyres_max_9", "full"
    assert [tuple(p) for p in proc.image_processor.image_grid_pinpoints] == list(ONEVISION_PINPOINTS)
    return proc


def test_llava_next_count_and_canvas_equal_the_processor_for_every_size():
    enc = hrperc.create_encoder("llava_next", _clip())
    proc, pinpoints = _next_processor(), [list(p) for p in LLAVA_NEXT_PINPOINTS]
    sizes = _sizes(336, seed=1, ties=_pinpoint_ties(LLAVA_NEXT_PINPOINTS))
    assert len(sizes) >= 2000
    for h, w in sizes:
        expected = proc._get_number_of_features(h, w, 336, 336) - 1  # strategy "default": CLS dropped
        plan = enc.view_plan((h, w))
        assert plan.num_tokens == enc.num_tokens((h, w)) == expected, (h, w)
        canvas = tuple(select_best_resolution((h, w), pinpoints))
        assert plan.anyres.canvas == canvas and plan.grid == (canvas[0] // 336, canvas[1] // 336), (h, w)
        assert plan.views == 1 + plan.grid[0] * plan.grid[1], (h, w)
    # images under one tile on both sides: every canvas keeps all pixels; transformers' tie-break (landscape)
    small = [(h, w) for h in range(1, 336, 23) for w in range(1, 336, 29)]
    assert {enc.plan(s).anyres.canvas for s in small} == {(336, 672)}


def test_onevision_count_and_canvas_equal_the_processor_for_every_size():
    enc = hrperc.create_encoder("llava_onevision", _siglip())
    proc, pinpoints = _onevision_processor(), [list(p) for p in ONEVISION_PINPOINTS]
    sizes = _sizes(384, seed=2, ties=_pinpoint_ties(ONEVISION_PINPOINTS))
    assert len(sizes) >= 2000
    shrunk = 0
    for h, w in sizes:
        expected = proc._get_number_of_features(h, w, 384, 384)  # strategy "full": nothing dropped
        plan = enc.view_plan((h, w))
        assert plan.num_tokens == enc.num_tokens((h, w)) == expected, (h, w)
        canvas = tuple(select_best_resolution((h, w), pinpoints))
        assert plan.anyres.canvas == canvas and plan.grid == (canvas[0] // 384, canvas[1] // 384), (h, w)
        rows, cols = plan.anyres.unpadded
        shrunk += plan.layout[-1].shape[0] < rows
    assert shrunk > 100  # the anyres_max_9 shrink is exercised


@pytest.mark.parametrize("recipe", ["llava_next", "llava_onevision"])
def test_unpadded_shape_equals_the_model_unpad_image(recipe):
    tile, model, unpad = (336, _clip(), unpad_image) if recipe == "llava_next" else (384, _siglip(), ov_unpad_image)
    enc = hrperc.create_encoder(recipe, model)
    ht = tile // 14
    for h, w in _sizes(tile, n=200, seed=3)[::2] + [(1, 4000), (4000, 1), (5000, 3000), (300, 200)]:
        plan = enc.view_plan((h, w))
        gh, gw = plan.grid
        features = torch.zeros(1, 1, 1).expand(1, gh * ht, gw * ht)
        assert plan.anyres.unpadded == tuple(unpad(features, (h, w)).shape[1:]), (h, w)


def test_internvl_count_grid_and_views_equal_the_processor_for_every_size():
    from transformers import GotOcr2ImageProcessor

    enc = hrperc.create_encoder("internvl", _internvl())
    ip = GotOcr2ImageProcessor(crop_to_patches=True, size={"height": 448, "width": 448}, max_patches=12, min_patches=1)
    sizes = _sizes(448, seed=4, ties=_ratio_ties(448))
    assert len(sizes) >= 2000
    for h, w in sizes:
        patches = ip.get_number_of_image_patches(h, w, {})
        plan = enc.view_plan((h, w))
        assert enc.num_tokens((h, w)) == plan.num_tokens == 256 * patches, (h, w)
        cols, rows = get_optimal_tiled_canvas((h, w), (448, 448), 1, 12)
        assert plan.grid == (rows, cols), (h, w)
        assert plan.views == enc.num_backbone_passes((h, w)) == patches, (h, w)


# --- 2. S2 against the S2-wrapper -------------------------------------------------------------------------
# Transcribed from bfshi/scaling_on_scales (commit 9c008a3): split_chessboard, merge_chessboard and
# batched_forward from s2wrapper/utils.py, forward from s2wrapper/core.py.
def split_chessboard(x, num_split):
    B, C, H, W = x.shape
    assert H % num_split == 0 and W % num_split == 0
    return rearrange(x, "b c (nh h) (nw w) -> (nh nw b) c h w", nh=num_split, nw=num_split)


def merge_chessboard(x, num_split):
    B, C, H, W = x.shape
    assert B % (num_split**2) == 0
    return rearrange(x, "(nh nw b) c h w -> b c (nh h) (nw w)", nh=num_split, nw=num_split)


def batched_forward(model, x, batch_size=-1):
    if batch_size == -1:
        return model(x)
    return torch.cat([model(x) for x in x.split(batch_size)], dim=0)


def s2_forward(
    model,
    input,
    scales=None,
    img_sizes=None,
    max_split_size=None,
    resize_output_to_idx=0,
    num_prefix_token=0,
    output_shape="bnc",
    split_forward=False,
):
    assert input.dim() == 4 and input.shape[2] == input.shape[3]
    b, c, input_size, _ = input.shape
    img_sizes = img_sizes or [int(input_size * scale) for scale in scales]
    max_split_size = max_split_size or input_size
    num_splits = [math.ceil(size / max_split_size) for size in img_sizes]
    input_multiscale = []
    for size, num_split in zip(img_sizes, num_splits):
        x = F.interpolate(input.to(torch.float32), size=size, mode="bicubic").to(input.dtype)
        input_multiscale.append(split_chessboard(x, num_split=num_split))
    outs_multiscale = [batched_forward(model, x, b) if split_forward else model(x) for x in input_multiscale]
    if num_prefix_token > 0:
        outs_prefix_multiscale = [out[:, :num_prefix_token] for out in outs_multiscale]
        outs_multiscale = [out[:, num_prefix_token:] for out in outs_multiscale]
    if output_shape == "bnc":
        outs_multiscale = [
            rearrange(out, "b (h w) c -> b c h w", h=int(out.shape[1] ** 0.5), w=int(out.shape[1] ** 0.5))
            for out in outs_multiscale
        ]
    outs_multiscale = [merge_chessboard(out, num_split=n) for n, out in zip(num_splits, outs_multiscale)]
    output_size = outs_multiscale[resize_output_to_idx].shape[-2]
    out = torch.cat(
        [F.interpolate(o.to(torch.float32), size=output_size, mode="area").to(o.dtype) for o in outs_multiscale], dim=1
    )
    if output_shape == "bnc":
        out = rearrange(out, "b c h w -> b (h w) c")
    if num_prefix_token > 0:
        outs_prefix_multiscale = [torch.stack(o.split(b, dim=0), dim=0).mean(dim=0) for o in outs_prefix_multiscale]
        out = torch.cat([torch.cat(outs_prefix_multiscale, dim=-1), out], dim=1)
    return out


def _s2_input(img, bb, side, pad=True):
    """The square canvas hrperc feeds S2 (LLaVA's preprocessing at the largest scale), normalized."""
    if pad:
        canvas = pp.resize(pp.pad_to_square(img, tuple(int(255 * m) for m in bb.mean)), (side, side))
    else:
        canvas = pp.center_crop(pp.resize(img, pp.shortest_edge_size(img.shape[-2:], side)), (side, side))
    mean, std = torch.tensor(bb.mean).view(3, 1, 1), torch.tensor(bb.std).view(3, 1, 1)
    return ((canvas.float() / 255 - mean) / std)[None]


@pytest.mark.parametrize("scales", [(1, 2), (1, 2, 3)])
@pytest.mark.parametrize("kind", ["timm", "hf_prefix"])
@torch.no_grad()
def test_s2_equals_the_s2_wrapper(scales, kind):
    t = 56 if kind == "timm" else 28
    model = tiny_vit(t, num_classes=1000).eval() if kind == "timm" else _clip(image_size=t, patch_size=7, hidden=32)
    enc = hrperc.create_encoder("s2", model, scales=scales)
    bb = enc.backbone
    if kind == "timm":  # features already drop the CLS
        ref_model, prefix = (lambda x: bb.features(x, layer=-2)), 0
    else:  # the raw HF CLIP tower, CLS included (S2 averages it over the splits and puts it first)
        ref_model, prefix = (lambda x: model(pixel_values=x, output_hidden_states=True).hidden_states[-2]), 1
    g = torch.Generator().manual_seed(1)
    sizes = [(90, 130), (150, 60), (t, t), (37, 200)]
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
    side = max(scales) * t
    refs = []
    for img in images:
        ref = s2_forward(
            ref_model,
            _s2_input(img, bb, side),
            img_sizes=[s * t for s in scales],
            max_split_size=t,
            num_prefix_token=prefix,
        )
        refs.append(ref[:, prefix:])  # hrperc's output has no prefix tokens
        out = enc(img)
        assert out.tokens.shape == ref[:, prefix:].shape == (1, (t // 7) ** 2, len(scales) * bb.hidden_size)
        torch.testing.assert_close(out.tokens, ref[:, prefix:], atol=1e-5, rtol=0)
        assert out.encoded["encoded"] == sum(s * s for s in scales)
    ragged = enc(images)  # a ragged list: one batched pass, each image its own canvas
    assert ragged.encoded["encoded"] == len(images) * sum(s * s for s in scales)
    torch.testing.assert_close(ragged.tokens, torch.cat(refs), atol=1e-5, rtol=0)


@torch.no_grad()
def test_s2_without_padding_equals_the_s2_wrapper_on_the_centre_crop():
    enc = hrperc.create_encoder("s2", tiny_vit(56, num_classes=1000).eval(), scales=(1, 2), pad=False)
    bb = enc.backbone
    img = torch.randint(0, 256, (3, 70, 150), dtype=torch.uint8)
    ref = s2_forward(
        lambda x: bb.features(x, layer=-2), _s2_input(img, bb, 112, pad=False), img_sizes=[56, 112], max_split_size=56
    )
    torch.testing.assert_close(enc(img).tokens, ref, atol=1e-5, rtol=0)


# --- 3. InfiMM-HD by its properties ----------------------------------------------------------------------
@pytest.mark.parametrize("tile,max_side", [(56, 3), (448, 3), (56, 2)])
def test_infimm_hd_plan_properties_over_many_sizes(tile, max_side):
    model = tiny_vit(56, num_classes=1000).eval() if tile == 56 else _internvl()
    enc = hrperc.create_encoder("infimm_hd", model, max_side=max_side)
    ht = tile // (7 if tile == 56 else 14)
    for H, W in _sizes(tile, n=2000, seed=5):
        plan = enc.view_plan((H, W))
        gh, gw = plan.grid
        geo = plan.geometry
        top, left, h, w = geo.valid_box
        assert (top, left) == (0, 0) and geo.canvas_size == (gh * tile, gw * tile), (H, W)
        # the grid covers the resized content, with no empty row or column of tiles
        assert (gh - 1) * tile < h <= gh * tile and (gw - 1) * tile < w <= gw * tile, (H, W)
        # the long side is a whole number of tiles, at most max_side, and as many as the image needs
        long, short, long_c, short_c = (H, W, h, w) if H >= W else (W, H, w, h)
        n = min(max_side, math.ceil(long / tile))
        assert long_c == n * tile and max(gh, gw) == n <= max_side, (H, W)
        # the aspect ratio is kept (to the pixel), the short side at least one pixel
        assert short_c == 1 or abs(short_c - short * n * tile / long) <= 0.5, (H, W)
        assert plan.views == enc.num_backbone_passes((H, W)) == 1 + gh * gw, (H, W)
        assert enc.num_tokens((H, W)) == plan.num_tokens == ht * ht * (1 + gh * gw), (H, W)
        (glob, tiles) = plan.layout
        assert (glob.source, glob.length, glob.shape) == ("global", ht * ht, (ht, ht))
        assert (tiles.source, tiles.shape, tiles.newline) == ("tiles", (gh * ht, gw * ht), False)


@torch.no_grad()
def test_infimm_hd_tokens_are_the_global_view_and_the_canvas_tiles():
    enc = hrperc.create_encoder("infimm_hd", tiny_vit(56, num_classes=1000).eval())
    bb, t, p, ht = enc.backbone, 56, 7, 8
    g = torch.Generator().manual_seed(2)
    sizes = [(50, 130), (170, 60), (56, 56), (200, 200), (20, 300), (113, 57)]
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
    out = enc(images)
    padded = 0
    for b, img in enumerate(images):
        plan = enc.view_plan(tuple(img.shape[-2:]))
        (gh, gw), (_, _, h, w) = plan.grid, plan.geometry.valid_box
        assert out.num_tokens[b] == enc.num_tokens(tuple(img.shape[-2:])) == ht * ht * (1 + gh * gw)
        tokens = out.tokens[b, : out.num_tokens[b]]
        assert out.token_mask[b].sum() == out.num_tokens[b] and not out.tokens[b, out.num_tokens[b] :].any()
        glob = bb.features(bb.normalize(pp.to_unit(pp.resize(img, (t, t)))[None]), layer=-1)[0]
        torch.testing.assert_close(tokens[: ht * ht], glob, atol=1e-5, rtol=0)
        canvas = F.pad(pp.resize(img, (h, w)), (0, gw * t - w, 0, gh * t - h))  # zeros right / bottom
        fmap = tokens[ht * ht :].view(gh * ht, gw * ht, -1)
        # the reference cuts the tiles by hand (row-major) and runs them in one backbone call
        tiles = torch.stack([canvas[:, i * t : (i + 1) * t, j * t : (j + 1) * t] for i in range(gh) for j in range(gw)])
        refs = bb.features(bb.normalize(pp.to_unit(tiles)), layer=-1).view(gh, gw, ht, ht, -1)
        for i in range(gh):
            for j in range(gw):
                torch.testing.assert_close(
                    fmap[i * ht : (i + 1) * ht, j * ht : (j + 1) * ht], refs[i, j], atol=1e-5, rtol=0
                )
        rows, cols = torch.arange(gh * ht) * p < h, torch.arange(gw * ht) * p < w
        assert torch.equal(out.valid_masks[b], rows[:, None] & cols[None, :]), sizes[b]
        padded += int((~out.valid_masks[b]).any())
    assert padded >= 3  # the padding is there to be marked


# --- 4. every recipe: ragged batch == per-image calls, one batched pass, chunked by max_batch ------------
RECIPES = ["llava15", "llava_next", "llava_onevision", "internvl", "s2", "infimm_hd", "inf_llava"]


def _counting(enc):
    calls = []
    inner = enc.backbone._patch_tokens

    def counted(pixels, k):
        calls.append(pixels.shape[0])
        return inner(pixels, k)

    enc.backbone._patch_tokens = counted
    return calls


@pytest.mark.parametrize("recipe", RECIPES)
@torch.no_grad()
def test_ragged_batch_equals_per_image_calls_in_one_pass_and_chunks(recipe):
    model = tiny_vit(56, num_classes=1000).eval()
    g = torch.Generator().manual_seed(3)
    sizes = [(50, 70), (120, 45), (50, 70), (200, 260), (30, 30), (60, 180)]
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
    enc = hrperc.create_encoder(recipe, model, max_batch=1000)
    views = [enc.num_backbone_passes(s) for s in sizes]
    calls = _counting(enc)
    out = enc(images)
    assert calls == [sum(views)] and out.encoded["encoded"] == sum(views)  # one batched pass over all views
    assert out.num_tokens == [enc.num_tokens(s) for s in sizes]
    assert out.tokens.shape[0] == len(images) and out.tokens.shape[1] == max(out.num_tokens)
    for b, img in enumerate(images):
        single = enc(img)
        n = out.num_tokens[b]
        assert single.num_tokens == [n]
        torch.testing.assert_close(out.tokens[b, :n], single.tokens[0], atol=1e-5, rtol=0)
        assert out.token_mask[b].sum() == n and not out.tokens[b, n:].any()
        assert torch.equal(out.slot_mask[b, :n], single.slot_mask[0])
    shared = {"dem": enc.dem} if recipe == "inf_llava" else {}  # the same (random) DEM
    small = hrperc.create_encoder(recipe, model, max_batch=3, **shared)
    small_calls = _counting(small)
    chunked = small(images)
    assert len(small_calls) == math.ceil(sum(views) / 3) and max(small_calls) <= 3 and sum(small_calls) == sum(views)
    torch.testing.assert_close(chunked.tokens, out.tokens, atol=1e-5, rtol=0)
