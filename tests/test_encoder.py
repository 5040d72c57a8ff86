"""HighResEncoder: batched + footprint-skipping path against a plain per-sub-image reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _messages import raises_naming
from _models import vit as tiny_vit
from _tolerance import assert_close_to_reference

import hrperc
from hrperc import DualPerspectiveCrop, DualPerspectiveEnhancement, HighResEncoder, wrap_backbone
from hrperc.recipes._common import options_of

_CROP_OPTIONS = options_of(DualPerspectiveCrop)  # grid, max_tiles, ..., auto_rule: its signature


def _encoder(backbone, **options) -> HighResEncoder:
    """A HighResEncoder with a DualPerspectiveCrop built from the crop options among ``options``."""
    crop = {k: options.pop(k) for k in _CROP_OPTIONS if k in options}
    bb = wrap_backbone(backbone)
    return HighResEncoder(bb, DualPerspectiveCrop(tile_size=bb.image_size, **crop) if crop else None, **options)


def _dem(dim=32, seed=1, **kw):
    torch.manual_seed(seed)
    return DualPerspectiveEnhancement(dim, heads=4, **kw)


def _reference(enc: HighResEncoder, image: torch.Tensor) -> torch.Tensor:
    """Plain pipeline for one float (3, H, W) image, fit='resize': eq. 11-13 / 16-17 by slicing, one ViT
    call per sub-image, every sub-image encoded, DEM computing every token, then the combine."""
    bb, crop = enc.backbone, enc.crop
    gh, gw = enc.plan(tuple(image.shape[-2:])).grid
    h, w = bb.image_size
    kw = dict(mode=crop.mode, antialias=crop.antialias, align_corners=False)
    canvas = F.interpolate(image[None].float(), size=(gh * h, gw * w), **kw)[0].to(image.dtype)
    local = [canvas[:, i * h : (i + 1) * h, j * w : (j + 1) * w] for i in range(gh) for j in range(gw)]
    strided = [canvas[:, i::gh, j::gw] for i in range(gh) for j in range(gw)]

    def vit(x):
        return bb.features(bb.normalize(x[None]), layer=enc.layer)[0]

    loc = torch.stack([vit(x) for x in local])
    glo = torch.stack([vit(x) for x in strided])
    thumb = vit(F.interpolate(image[None].float(), size=(h, w), **kw)[0].to(image.dtype)) if enc.thumbnail else None
    if enc.dem is not None:
        skip, enc.dem.skip_unread = enc.dem.skip_unread, False
        try:
            p = next(enc.dem.parameters(), None)  # a DEM may have none (directions="none", fusion="add")
            hi = enc.dem(loc.to(loc.dtype if p is None else p.dtype), glo, (gh, gw))[0]
        finally:
            enc.dem.skip_unread = skip
    else:
        ht, wt = bb.grid_size
        loc_map = hrperc.local_merge(loc.reshape(-1, ht, wt, loc.shape[-1]), (gh, gw), layout="nhwc")
        glo_map = hrperc.stride_merge(glo.reshape(-1, ht, wt, glo.shape[-1]), (gh, gw), layout="nhwc")
        hi = torch.cat([loc_map.flatten(0, 2), glo_map.flatten(0, 2)])
    if enc.combine == "mean":
        return (hi + thumb) / 2
    if enc.combine == "concat" and thumb is not None:
        return torch.cat([thumb, hi])
    return hi


# --- batched == serial -------------------------------------------------------------------------------
@pytest.mark.parametrize("combine, dem", [("mean", "dem"), ("concat", "dem"), ("none", "dem"), ("concat", None)])
def test_batched_skipping_equals_plain_reference(combine, dem):
    enc = _encoder(tiny_vit(), grid=(3, 3), dem=_dem() if dem else None, combine=combine, max_batch=7)
    images = torch.rand(2, 3, 90, 80)
    with torch.no_grad():
        out = enc(images)
        for b in range(2):
            torch.testing.assert_close(out.tokens[b], _reference(enc, images[b]), rtol=1e-5, atol=1e-5)
    assert out.token_mask.all() and out.num_tokens == [out.tokens.shape[1]] * 2


def test_ragged_batch_equals_each_image_alone():
    enc = _encoder(tiny_vit(), grid="auto", max_tiles=6, dem=_dem(), combine="concat", max_batch=5)
    images = [torch.rand(3, 30, 100), torch.rand(3, 90, 80), torch.rand(3, 57, 57)]
    with torch.no_grad():
        out = enc(images)
        assert len(set(out.grids)) == 3
        for b, img in enumerate(images):
            ref = _reference(enc, img)
            t = out.num_tokens[b]
            torch.testing.assert_close(out.tokens[b, :t], ref, rtol=1e-5, atol=1e-5)
            alone = enc(img).tokens[0]
            torch.testing.assert_close(out.tokens[b, :t], alone, rtol=1e-5, atol=1e-5)
            assert out.token_mask[b].sum() == t and not out.tokens[b, t:].any()


def test_ragged_token_counts_are_padded_and_masked():
    enc = _encoder(tiny_vit(), grid="auto", max_tiles=6, dem=None, combine="none")
    with torch.no_grad():
        out = enc([torch.rand(3, 28, 28), torch.rand(3, 60, 90)])
    assert out.num_tokens == [2 * 1 * 16, 2 * 6 * 16]
    assert out.tokens.shape == (2, 192, 32)
    assert out.token_mask.sum(1).tolist() == out.num_tokens
    assert not out.tokens[0, 32:].any()


@pytest.mark.parametrize("max_batch", [1, 4, 64])
def test_chunking_does_not_change_tokens(max_batch):
    dem = _dem()
    images = torch.rand(2, 3, 84, 84)
    with torch.no_grad():
        ref = _encoder(tiny_vit(), grid=(3, 3), dem=dem, max_batch=1000)(images).tokens
        got = _encoder(tiny_vit(), grid=(3, 3), dem=dem, max_batch=max_batch)(images).tokens
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_against_float64_reference(dtype):
    vit, dem = tiny_vit(), _dem()
    images = torch.rand(1, 3, 84, 84)
    encs = {}
    for dt in (dtype, torch.float64):
        encs[dt] = _encoder(
            wrap_backbone(tiny_vit()).to(dt), grid=(3, 3), dem=_dem().to(dt), combine="mean", max_batch=8
        )
        encs[dt].backbone.load_state_dict(wrap_backbone(vit).state_dict())
        encs[dt].dem.load_state_dict(dem.state_dict())
    with torch.no_grad():
        fast = encs[dtype](images.to(dtype)).tokens
        ref_lp = torch.stack([_reference(encs[dtype], img) for img in images.to(dtype)])
        ref64 = torch.stack([_reference(encs[torch.float64], img) for img in images.double()])
    assert fast.dtype == dtype
    assert_close_to_reference(fast, ref_lp, ref64, dtype)


# --- footprint ---------------------------------------------------------------------------------------
def test_released_footprint_skips_eight_strided_subimages_with_identical_tokens():
    dem = _dem()
    skip = _encoder(tiny_vit(), grid=(3, 3), dem=dem)
    full = _encoder(tiny_vit(), grid=(3, 3), dem=dem, encode_all=True)
    images = torch.rand(2, 3, 84, 84)
    with torch.no_grad():
        a, b = skip(images), full(images)
    assert a.encoded == {"encoded": 2 * 11, "skipped": 2 * 8}
    assert b.encoded == {"encoded": 2 * 19, "skipped": 0}
    assert skip.num_backbone_passes((84, 84)) == 11 and full.num_backbone_passes((84, 84)) == 19
    torch.testing.assert_close(a.tokens, b.tokens, rtol=0, atol=0)


@pytest.mark.parametrize(
    "grid, reduction, passes",
    [
        ((3, 3), "bilinear", 9 + 1 + 1),
        ((4, 4), "bilinear", 16 + 4 + 1),
        ((2, 2), "bilinear", 4 + 4 + 1),
        ((3, 3), "avg", 9 + 9 + 1),
    ],
)
def test_footprint_follows_the_dem_reduction(grid, reduction, passes):
    # tiles of 8x8 tokens so that 2x2, 3x3 and 4x4 grids all reduce by an integer factor
    enc = _encoder(tiny_vit(img=32, patch=4), grid=grid, max_tiles=16, dem=_dem(reduction=reduction))
    assert enc.num_backbone_passes((64, 64)) == passes
    with torch.no_grad():
        image = torch.rand(1, 3, 64, 64)
        torch.testing.assert_close(enc(image).tokens[0], _reference(enc, image[0]), rtol=1e-5, atol=1e-5)


# --- num_tokens --------------------------------------------------------------------------------------
_SIZES = [(28, 28), (20, 100), (100, 20), (57, 83), (90, 80), (141, 29), (33, 160), (84, 84), (63, 120)]


@pytest.mark.parametrize(
    "options",
    [
        dict(dem="dem", combine="mean"),
        dict(dem="dem", combine="concat"),
        dict(dem="dem", combine="none", thumbnail=False),
        dict(dem="none_reduction", combine="concat"),
        dict(dem=None, combine="concat"),
        dict(dem=None, combine="none", thumbnail=True),
        dict(dem=None, combine="concat", thumbnail=False),
    ],
)
@pytest.mark.parametrize("grid", ["auto", "floor_pad", (2, 3)])
def test_num_tokens_matches_forward(options, grid):
    options = dict(options)
    dem = options.pop("dem")
    dem = {"dem": _dem(), "none_reduction": _dem(reduction="none"), None: None}[dem]
    kw = dict(grid="floor", fit="pad") if grid == "floor_pad" else dict(grid=grid)
    enc = _encoder(tiny_vit(), max_tiles=42, dem=dem, **options, **kw)
    with torch.no_grad():
        out = enc([torch.rand(3, h, w) for h, w in _SIZES])
    expected = [enc.num_tokens(s) for s in _SIZES]
    assert out.num_tokens == expected
    assert out.token_mask.sum(1).tolist() == expected
    assert out.tokens.shape[1] == max(expected)
    for b, layout in enumerate(out.layout):
        assert layout[0].start == 0 and layout[-1].stop == expected[b]
        assert all(x.stop == y.start for x, y in zip(layout, layout[1:]))


def test_num_tokens_formula_for_vit_l_geometry():
    vit = tiny_vit(img=336, patch=14, dim=32, depth=2)  # ViT-L/14-336 geometry, tiny width
    enc = hrperc.create_encoder("inf_llava", vit, dem=_dem())
    assert enc.num_tokens((1008, 1008)) == 576 and enc.num_tokens((480, 640)) == 576
    assert enc.plan((480, 640)).canvas_size == (1008, 1008)
    assert enc.num_backbone_passes((1008, 1008)) == 11
    concat = _encoder(vit, grid=(3, 3), dem=None, combine="concat")
    assert concat.num_tokens((1008, 1008)) == 576 * (2 * 9 + 1)


def test_inf_llava_preset_configuration():
    enc = hrperc.create_encoder("inf_llava", tiny_vit(img=42, patch=14), dem=_dem())
    assert (enc.crop.grid, enc.crop.mode, enc.crop.antialias, enc.crop.fit) == ((3, 3), "bicubic", False, "resize")
    assert (enc.combine, enc.layer, enc.thumbnail, enc.encode_all) == ("mean", -2, True, False)
    assert enc.dem.pairing == "released" and enc.dem.reduction == "bilinear"
    with torch.no_grad():
        image = torch.rand(3, 200, 150)
        out = enc(image)
        torch.testing.assert_close(out.tokens[0], _reference(enc, image), rtol=1e-5, atol=1e-5)
    assert out.tokens.shape == (1, 9, 32)
    fresh = hrperc.create_encoder("inf_llava", tiny_vit(img=42, patch=14))
    assert isinstance(fresh.dem, DualPerspectiveEnhancement) and fresh.dem.dim == 32


# --- inputs ------------------------------------------------------------------------------------------
def test_uint8_pil_and_float_inputs_agree():
    from PIL import Image

    enc = _encoder(tiny_vit(), grid=(2, 2), max_tiles=4, dem=_dem())
    arr = np.random.default_rng(0).integers(0, 256, size=(60, 70, 3), dtype=np.uint8)
    as_uint8 = torch.from_numpy(arr).permute(2, 0, 1)
    with torch.no_grad():
        ref = enc(as_uint8.float() / 255).tokens
        torch.testing.assert_close(enc(as_uint8).tokens, ref)
        torch.testing.assert_close(enc(Image.fromarray(arr)).tokens, ref)
        torch.testing.assert_close(enc([Image.fromarray(arr), as_uint8]).tokens, ref.expand(2, -1, -1))
        gray = torch.rand(1, 60, 70)
        torch.testing.assert_close(enc(gray).tokens, enc(gray.expand(3, -1, -1)).tokens)


def test_valid_masks_mark_padding():
    enc = _encoder(tiny_vit(), grid="auto", fit="pad", max_tiles=4, dem=None, combine="none")
    with torch.no_grad():
        out = enc(torch.rand(3, 28, 40))  # grid 1x2, canvas 28x56, image in the left 40 columns
    assert out.grids == [(1, 2)]
    mask = out.valid_masks[0]
    assert mask.shape == (4, 8) and mask[:, :6].all() and not mask[:, 6:].any()


# --- training ----------------------------------------------------------------------------------------
def test_frozen_backbone_by_default_and_dem_trains():
    enc = _encoder(tiny_vit(), grid=(2, 2), max_tiles=4, dem=_dem()).train()
    assert not enc.backbone.training and enc.dem.training
    assert not any(p.requires_grad for p in enc.backbone.parameters())
    enc(torch.rand(1, 3, 56, 56)).tokens.square().sum().backward()
    assert all(p.grad is None for p in enc.backbone.parameters())
    assert enc.dem.attention.linears[0].weight.grad is not None  # the attention's query projection trains
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.dem.parameters())


def test_train_backbone_with_grad_checkpointing_same_gradients():
    images = torch.rand(1, 3, 56, 56)
    grads = []
    for ckpt in (False, True):
        enc = _encoder(
            tiny_vit(), grid=(2, 2), max_tiles=4, dem=_dem(), train_backbone=True, grad_checkpointing=ckpt, max_batch=3
        ).train()
        assert enc.backbone.training and enc.backbone.model.grad_checkpointing == ckpt
        enc(images).tokens.square().sum().backward()
        grads.append({n: p.grad for n, p in enc.backbone.named_parameters() if p.grad is not None})
    assert "model.blocks.0.attn.qkv.weight" in grads[0] and grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6)


# --- errors ------------------------------------------------------------------------------------------
def test_errors_are_clear():
    vit = tiny_vit()
    with raises_naming(ValueError, "(20, 100)", "(28, 28)", "fit='pad'"):
        _encoder(vit, grid="floor", dem=None, combine="none")(torch.rand(3, 20, 100))
    with raises_naming(ValueError, "combine='mean'", "dem=None", "dem='default'", "combine='concat'"):
        _encoder(vit, dem=None, combine="mean")
    with raises_naming(ValueError, "combine='sum'", "'mean'", "'concat'", "'none'"):
        _encoder(vit, combine="sum")
    with raises_naming(ValueError, "max_batch=0", "'auto'", ">= 1"):
        _encoder(vit, max_batch=0)
    with raises_naming(ValueError, "name='vit_base_patch16_224'", "'timm:<model>'"):
        HighResEncoder("vit_base_patch16_224")
    with raises_naming(ValueError, "layer=5", "2-layer", "1..2", "-2..-1"):
        _encoder(vit, layer=5)
    with raises_naming(ValueError, "combine='mean'", "16 tokens", "grid (2, 2)", "64", "(4, 4)", "combine='concat'"):
        _encoder(vit, grid=(2, 2), max_tiles=4, dem=_dem(reduction="none")).num_tokens((56, 56))
    with raises_naming(ValueError, "4 channels", "(4, 56, 56)", "(3, H, W)", "img[:3]"):
        _encoder(vit, dem=None, combine="none")(torch.rand(4, 56, 56))


def test_auto_chunking_uses_a_cpu_token_budget():
    # Documented: on a CPU about 2048 tokens per call, i.e. 3 ViT-L/14-336 tiles or 10 ViT-B/16 tiles,
    # and 768 // width times that (at most 8x) for towers narrower than 768.
    big = _encoder(wrap_backbone(tiny_vit(img=336, patch=14, dim=1024, depth=2)), dem=None, combine="none")
    assert big.max_batch == "auto" and big.chunk_size == 3  # 577 tokens per tile
    base = _encoder(wrap_backbone(tiny_vit(img=224, patch=16, dim=768, depth=2)), dem=None, combine="none")
    assert base.chunk_size == 10  # 197 tokens per tile
    narrow = _encoder(wrap_backbone(tiny_vit(img=336, patch=14, dim=64, depth=2)), dem=None, combine="none")
    assert narrow.chunk_size == 2048 * 8 // 577  # 28 tiles of a width-64 tower
    mid = _encoder(wrap_backbone(tiny_vit(img=336, patch=14, dim=384, depth=2)), dem=None, combine="none")
    assert mid.chunk_size == 2048 * 2 // 577  # width 384: twice the tokens
    assert _encoder(tiny_vit(), max_batch=3, dem=None, combine="none").chunk_size == 3


# --- audit follow-ups --------------------------------------------------------------------------------
@pytest.mark.parametrize("combine", ["mean", "concat", "none"])
def test_parameter_free_dem(combine):
    # Table 6's plain-addition baseline: no attention, fusion by addition -> a DEM with no parameters.
    dem = DualPerspectiveEnhancement(32, heads=4, directions="none", fusion="add")
    assert next(dem.parameters(), None) is None
    enc = _encoder(tiny_vit(), grid=(3, 3), dem=dem, combine=combine, max_batch=5)
    images = torch.rand(2, 3, 84, 84)
    with torch.no_grad():
        out = enc(images)
        for b in range(2):
            torch.testing.assert_close(out.tokens[b], _reference(enc, images[b]), rtol=1e-5, atol=1e-5)
    assert out.tokens.shape[1] == enc.num_tokens((84, 84))
    half = _encoder(wrap_backbone(tiny_vit()).to(torch.bfloat16), grid=(3, 3), dem=dem, combine=combine)
    with torch.no_grad():
        assert half(images).tokens.dtype == torch.bfloat16  # computes in the backbone's dtype


def test_combine_none_skips_the_thumbnail_pass():
    images = torch.rand(2, 3, 84, 84)
    with_thumb = _encoder(tiny_vit(), grid=(3, 3), dem=_dem(), combine="none", thumbnail=True)
    without = _encoder(tiny_vit(), grid=(3, 3), dem=_dem(), combine="none", thumbnail=False)
    assert not with_thumb.encodes_thumbnail
    assert with_thumb.num_backbone_passes((84, 84)) == without.num_backbone_passes((84, 84)) == 10
    with torch.no_grad():
        a, b = with_thumb(images), without(images)
        sub = with_thumb.subimage_features(images)  # the raw features still include the thumbnail
    assert a.encoded == b.encoded == {"encoded": 2 * 10, "skipped": 2 * 8}
    assert a.thumbnail_tokens is None
    torch.testing.assert_close(a.tokens, b.tokens, rtol=0, atol=0)
    assert sub.thumbnail is not None and sub.thumbnail.shape == (2, 16, 32) and sub.encoded == 2 * 11
    concat = _encoder(tiny_vit(), grid=(3, 3), dem=_dem(), combine="concat")
    assert concat.encodes_thumbnail and concat.num_backbone_passes((84, 84)) == 11
    # The thumbnail is not even resized when it is not encoded.
    assert with_thumb.subimage_features(images, thumbnail=False).crops.thumbnail is None
    assert with_thumb.crop(images, thumbnail=False).thumbnail is None
    assert with_thumb.crop(images).thumbnail.shape == (2, 3, 28, 28)


@pytest.mark.parametrize(
    "crop, options",
    [
        (dict(grid="auto", fit="resize_pad"), dict(dem="dem", combine="mean")),
        (dict(grid="auto", fit="resize_pad"), dict(dem=None, combine="concat")),
        (dict(grid="auto", auto_rule="aspect"), dict(dem="dem", combine="concat")),
        (dict(grid="auto", auto_rule="aspect", fit="pad"), dict(dem=None, combine="none")),
        (dict(grid="auto"), dict(dem="output_size", combine="concat")),
        (dict(grid=(2, 3), fit="resize_pad"), dict(dem="output_size", combine="none", thumbnail=False)),
    ],
)
def test_num_tokens_matches_forward_more_policies(crop, options):
    options = dict(options)
    dem = {"dem": lambda: _dem(), "output_size": lambda: _dem(output_size=(3, 5)), None: lambda: None}[
        options.pop("dem")
    ]()
    enc = _encoder(tiny_vit(), max_tiles=12, dem=dem, **options, **crop)
    sizes = [(28, 28), (20, 100), (100, 20), (57, 83), (141, 29)]
    with torch.no_grad():
        out = enc([torch.rand(3, h, w) for h, w in sizes])
    expected = [enc.num_tokens(s) for s in sizes]
    assert out.num_tokens == expected and out.token_mask.sum(1).tolist() == expected
    for b, layout in enumerate(out.layout):
        assert layout[0].start == 0 and layout[-1].stop == expected[b]
    if dem is not None and dem.output_size is not None:
        assert any(seg.length == 15 for seg in out.layout[0])  # the (3, 5) DEM output
