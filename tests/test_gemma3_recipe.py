"""The ``gemma3`` recipe against transformers' Gemma 3: the pan-and-scan crops and counts of
:mod:`hrperc.ops.pan_and_scan` equal to both image-processor backends' over thousands of sizes, the token
count and the text equal to ``Gemma3Processor``'s, the pixels equal to its ``pixel_values`` bit for bit, tokens
equal to ``get_image_features`` within the tolerance rule, a ragged batch equal to its images alone in one
backbone pass, and the refusals."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from _messages import FIX, raises_naming
from _tolerance import assert_close_to_reference

tf = pytest.importorskip("transformers")

from _gemma3_tiny import MM_TOKENS, build_gemma3, images, processor  # noqa: E402

import hrperc  # noqa: E402
from hrperc.ops import pan_and_scan as pas  # noqa: E402
from hrperc.recipes.gemma3 import Gemma3FrontEnd, Gemma3Projector, Gemma3Tower, image_text  # noqa: E402

# pan and scan on the tiny model's images: none (square-ish, small), 2 crops landscape / portrait (the last one
# cut), 3 and 4 crops, crops refused for their size (2000 x 200: 200 px < 256), a repeated size
SIZES = [(300, 700), (50, 60), (700, 301), (300, 700), (260, 1100), (1000, 260), (200, 2000), (257, 1290)]
# option sets (min_crop_size, max_num_crops, min_ratio_to_activate): transformers' defaults, then others
OPTION_SETS = [(256, 4, 1.2), (32, 8, 1.0), (1, 3, 2.5), (100, 1, 1.2), (64, 6, 1.5), (1, 5, 1.0)]
# the sweep: transformers' defaults over every size on both backends, the other sets over a quarter of the
# sizes, each on one backend (the last set cuts tiny images into empty crops, which are refused)
SWEEPS = {"torchvision": (0, 1, 3, 5), "pil": (0, 2, 4, 5)}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only wait on each other (and on a shared machine, on everything else)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sweep_sizes() -> list[tuple[int, int]]:
    """~2000 sizes: tiny, thin, huge, at the ratio and crop-size boundaries, multiples of 256, both orientations."""
    sides = [1, 2, 3, 7, 16, 63, 64, 100, 213, 255, 256, 257, 300, 307, 358, 359, 360, 384, 511, 512, 513, 640]
    sides += [767, 768, 769, 896, 1000, 1023, 1024, 1025, 1279, 1280, 1281, 1536, 2047, 2048, 3000, 4096, 9999]
    sizes = set(itertools.product(sides, sides))
    rng = np.random.default_rng(0)
    sizes |= {(int(h), int(w)) for h, w in rng.integers(1, 5000, size=(500, 2))}
    for h in (100, 255, 256, 300, 500, 1000):  # the activation ratio 1.2 and the rounding of W / H + 0.5
        for w in (int(1.2 * h) - 1, int(1.2 * h), int(1.2 * h) + 1, int(2.5 * h), int(3.5 * h), int(4.5 * h)):
            sizes |= {(h, w), (w, h)}
    return sorted(sizes)


def _reference_crops(ip, H, W, options, backend):
    """transformers' crops of an (H, W) image as (top, left, h, w) boxes, read off index tensors (no pixels)."""
    m, n, r = options
    # Both backends only read the shape and slice, so index arrays broadcast from one row / column stand in
    # for pixels: each crop's first entries are its top and left.
    cut = ip.pan_and_scan_batched if backend == "torchvision" else ip.pan_and_scan
    top = np.broadcast_to(np.arange(H)[None, :, None], (1, H, W))
    left = np.broadcast_to(np.arange(W)[None, None, :], (1, H, W))
    a, b = cut(top, m, n, r), cut(left, m, n, r)
    out = []
    for x, y in zip(a, b):
        shape = tuple(x.shape[-2:])
        out.append((int(x[..., 0, 0].item()), int(y[..., 0, 0].item()), *shape) if min(shape) else None)
    return tuple(out)


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_crops_equal_both_image_processor_backends_over_thousands_of_sizes(backend):
    ip = tf.Gemma3ImageProcessor() if backend == "torchvision" else tf.Gemma3ImageProcessorPil()
    every, refused, cropped = _sweep_sizes(), 0, 0
    assert len(every) > 2000
    for k in SWEEPS[backend]:
        options, sizes = OPTION_SETS[k], every if k == 0 else every[k % 4 :: 4]
        kw = dict(zip(("min_crop_size", "max_num_crops", "min_ratio_to_activate"), options))
        for H, W in sizes:
            ref = _reference_crops(ip, H, W, options, backend)
            if None in ref:  # an empty crop past the image: transformers' resize fails on it, hrperc refuses
                with raises_naming(ValueError, f"image_size={(H, W)}", "pan_and_scan_min_crop_size", FIX):
                    pas.pan_and_scan_crops((H, W), **kw)
                refused += 1
                continue
            mine = pas.pan_and_scan_crops((H, W), **kw)
            assert mine == ref, (H, W, options)
            cropped += bool(ref)
            if (H + W) % 4:  # the grid and the counts follow the crops: checked on a quarter of the sizes
                continue
            rows, cols = pas.pan_and_scan_grid((H, W), **kw)
            assert rows * cols == len(ref) and (rows == 1 or cols == 1 or not ref)
            tokens = pas.gemma3_num_tokens((H, W), do_pan_and_scan=True, mm_tokens_per_image=256, **kw)
            assert tokens == 256 * (1 + len(ref))
            assert pas.gemma3_num_tokens((H, W), **kw) == 256  # without pan and scan: the image alone
    assert refused > 0 and cropped > 1500  # the sweep reaches both the refusal and many crops


@pytest.fixture(scope="module")
def tiny():
    return build_gemma3()


def _process(proc, imgs, **kw):
    return proc(
        images=[[img] for img in imgs],
        text=["<start_of_image> describe it"] * len(imgs),
        return_tensors="pt",
        padding=True,
        return_text_replacement_offsets=True,
        **kw,
    )


def _encoder(model, **kw):
    return hrperc.create_encoder("gemma3", model.model.vision_tower, mm_tokens_per_image=MM_TOKENS, **kw)


@pytest.mark.parametrize("options", OPTION_SETS[:3])
def test_counts_and_text_equal_the_processor_s_on_twenty_images(tiny, options):
    model, _ = tiny
    m, n, r = options
    call = dict(pan_and_scan_min_crop_size=m, pan_and_scan_max_num_crops=n, pan_and_scan_min_ratio_to_activate=r)
    sizes = SIZES + [(400, 400), (33, 900), (900, 33), (480, 640), (640, 480), (256, 1280), (1280, 256)]
    sizes += [(513, 256), (100, 1000), (999, 333), (2, 5), (300, 1500)]
    imgs = images(sizes)
    proc = processor()
    tok = proc.tokenizer
    # without pan and scan the options change nothing: that text is checked once, with the defaults
    for pan in (False, True) if options == OPTION_SETS[0] else (True,):
        enc = _encoder(model, do_pan_and_scan=pan, **call)
        batch = _process(proc, imgs, do_pan_and_scan=pan, **call)
        counts = (batch["input_ids"] == tok.image_token_id).sum(1).tolist()
        assert counts == [enc.num_tokens(s) for s in sizes]
        assert batch["num_crops"].tolist() if "num_crops" in batch else True
        for i, size in enumerate(sizes):
            layout = enc.plan(size).layout
            (offsets,) = batch["text_replacement_offsets"][i]
            assert (
                image_text(layout, boi=tok.boi_token, image=tok.image_token, eoi=tok.eoi_token)
                == offsets["replacement"]
            )
            assert [s.source for s in layout] == ["image"] + ["crop"] * (len(layout) - 1)
        if pan and options == OPTION_SETS[0]:
            assert {len(enc.plan(s).layout) - 1 for s in sizes} >= {0, 2, 3, 4}  # none, 2, 3 and 4 crops met


def test_options_are_transformers_names_and_defaults():
    defaults = dict(tf.Gemma3Processor.images_kwargs)
    import inspect

    params = inspect.signature(Gemma3FrontEnd.__init__).parameters
    for name in ("do_pan_and_scan", "pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops"):
        assert params[name].default == defaults[name], name
    assert params["pan_and_scan_min_ratio_to_activate"].default == defaults["pan_and_scan_min_ratio_to_activate"]
    assert params["mm_tokens_per_image"].default == tf.Gemma3Config().mm_tokens_per_image


@pytest.mark.parametrize("pan", [False, True])
def test_pixels_equal_the_processor_s_pixel_values_bit_for_bit(tiny, pan):
    model, proc = tiny
    enc = _encoder(model, do_pan_and_scan=pan)
    imgs = images(SIZES)
    batch = _process(proc, imgs, do_pan_and_scan=pan)
    views = []
    for img in imgs:
        v = enc.front_end.views(img[None], enc.plan(tuple(img.shape[-2:])))[0]
        assert v.dtype == torch.uint8  # resized in uint8, as the processor's torchvision backend
        views.append(enc.backbone.normalize(v))
    assert torch.equal(torch.cat(views), batch["pixel_values"])


@pytest.mark.parametrize("pan", [False, True])
def test_tokens_equal_get_image_features_within_the_tolerance_rule(tiny, pan):
    model, proc = tiny
    enc = _encoder(model, do_pan_and_scan=pan)
    imgs = images(SIZES, seed=1)
    batch = _process(proc, imgs, do_pan_and_scan=pan)
    ref64_model = copy.deepcopy(model).double()
    with torch.no_grad():
        ref = model.model.get_image_features(batch["pixel_values"]).pooler_output
        ref64 = ref64_model.model.get_image_features(batch["pixel_values"].double()).pooler_output
        out = enc(imgs, project=model.model.multi_modal_projector)
        last = model.model.vision_tower(batch["pixel_values"]).last_hidden_state
        plain = enc(imgs)
    mine = torch.cat([out.tokens[i, :n] for i, n in enumerate(out.num_tokens)])
    d = ref.shape[-1]
    assert mine.shape == ref.reshape(-1, d).shape and out.num_tokens == [enc.num_tokens(s) for s in SIZES]
    assert_close_to_reference(mine, ref.reshape(-1, d), ref64.reshape(-1, d), name="tokens")
    # without project: the tower's last_hidden_state average-pooled to 4 x 4 per view, as the projector pools it
    g, s = 8, 4
    pooled = last.view(-1, g // 2, 2, g // 2, 2, last.shape[-1]).mean((2, 4)).reshape(-1, s * s, last.shape[-1])
    mine_plain = torch.cat([plain.tokens[i, :n] for i, n in enumerate(plain.num_tokens)])
    torch.testing.assert_close(mine_plain, pooled.reshape(-1, last.shape[-1]), rtol=0, atol=1e-5)
    assert isinstance(enc.backbone, Gemma3Tower) and enc.token_width == model.config.vision_config.hidden_size


def test_a_ragged_batch_equals_its_images_alone_in_one_backbone_pass(tiny, monkeypatch):
    model, _ = tiny
    enc = _encoder(model, do_pan_and_scan=True, max_batch=1000)
    imgs = images(SIZES, seed=2)
    with torch.no_grad():
        singles = [enc(img) for img in imgs]
    calls = []
    features = enc.backbone.features

    def counting(pixels, *args, **kwargs):
        calls.append(pixels.shape[0])
        return features(pixels, *args, **kwargs)

    monkeypatch.setattr(enc.backbone, "features", counting)
    with torch.no_grad():
        out = enc(imgs)
    views = [enc.plan(s).views for s in SIZES]
    assert views == [3, 1, 3, 3, 5, 4, 1, 5] and calls == [sum(views)]
    assert out.num_tokens == [s.num_tokens[0] for s in singles] == [MM_TOKENS * v for v in views]
    for b, single in enumerate(singles):
        n = out.num_tokens[b]
        torch.testing.assert_close(out.tokens[b, :n], single.tokens[0], rtol=0, atol=1e-5)
        assert not out.tokens[b, n:].any() and out.token_mask[b].sum().item() == n


def test_the_projector_map_is_the_model_s_projector_after_its_pooling(tiny):
    model, _ = tiny
    pj = model.model.multi_modal_projector
    feats = torch.randn(3, 64, 32)  # three views of 8 x 8 patches
    with torch.no_grad():
        pooled = (
            torch.nn.functional.avg_pool2d(feats.transpose(1, 2).reshape(3, 32, 8, 8), 2).flatten(2).transpose(1, 2)
        )
        torch.testing.assert_close(Gemma3Projector(pj)(pooled), pj(feats), rtol=0, atol=1e-5)
    with raises_naming(TypeError, "projector=Linear", "multi_modal_projector", FIX):
        Gemma3Projector(torch.nn.Linear(2, 2))


def test_refusals_name_the_value_and_the_fix(tiny):
    model, _ = tiny
    tower = model.model.vision_tower
    with raises_naming(ValueError, "mm_tokens_per_image=15", "8 x 8", "[1, 4, 16, 64]", FIX):
        hrperc.create_encoder("gemma3", tower, mm_tokens_per_image=15)
    with raises_naming(ValueError, "mm_tokens_per_image=9", "[1, 4, 16, 64]", FIX):
        hrperc.create_encoder("gemma3", tower, mm_tokens_per_image=9)
    with raises_naming(ValueError, "mm_tokens_per_image=256", FIX):  # the released count on an 8 x 8 grid
        hrperc.create_encoder("gemma3", tower)
    with raises_naming(ValueError, "image_size=(64, 96)", "square", "896", FIX):
        Gemma3FrontEnd((64, 96), (8, 8), mm_tokens_per_image=16)
    with raises_naming(ValueError, "image_size=(60, 60)", "patch_size=(8, 8)", FIX):
        Gemma3FrontEnd((60, 60), (8, 8), mm_tokens_per_image=16)
    from timm.models.vision_transformer import VisionTransformer

    wide = VisionTransformer(img_size=(32, 48), patch_size=8, embed_dim=32, depth=1, num_heads=2)
    with raises_naming(ValueError, "image_size=(32, 48)", "square", FIX):
        hrperc.create_encoder("gemma3", wide, mm_tokens_per_image=4)
    bad = [
        (TypeError, dict(do_pan_and_scan="yes"), ["do_pan_and_scan='yes'"]),
        (ValueError, dict(pan_and_scan_min_crop_size=0), ["pan_and_scan_min_crop_size=0", ">= 1"]),
        (ValueError, dict(pan_and_scan_max_num_crops=0), ["pan_and_scan_max_num_crops=0", ">= 1"]),
        (TypeError, dict(pan_and_scan_max_num_crops=2.0), ["pan_and_scan_max_num_crops=2.0"]),
        (ValueError, dict(pan_and_scan_min_ratio_to_activate=float("nan")), ["pan_and_scan_min_ratio_to_activate=nan"]),
        (TypeError, dict(pan_and_scan_min_ratio_to_activate="1.2"), ["pan_and_scan_min_ratio_to_activate='1.2'"]),
        (TypeError, dict(pan_and_scan=True), ["pan_and_scan", "do_pan_and_scan"]),
    ]
    for exc, kw, names in bad:
        with raises_naming(exc, "create_encoder('gemma3')", *names, FIX if exc is ValueError else "ass"):
            _encoder(model, **kw)
    enc = _encoder(model, do_pan_and_scan=True, pan_and_scan_min_crop_size=1, pan_and_scan_max_num_crops=5)
    with raises_naming(ValueError, "image_size=(1, 7)", "pan_and_scan_min_crop_size=1", "empty", FIX):
        enc.num_tokens((1, 7))
    with raises_naming(ValueError, "image_size=(0, 7)", FIX):
        enc.num_tokens((0, 7))
    with raises_naming(TypeError, "layout=", "TokenSegment", FIX):
        image_text([(0, 16)], boi="<b>", image="<i>", eoi="</b>")


def test_bf16_tokens_are_within_the_tolerance_rule(tiny):
    model, proc = tiny
    imgs = images(SIZES[:5], seed=3)
    batch = _process(proc, imgs, do_pan_and_scan=True)
    low, ref64_model = copy.deepcopy(model).to(torch.bfloat16), copy.deepcopy(model).double()
    enc = _encoder(low, do_pan_and_scan=True)
    with torch.no_grad():
        ref = low.model.get_image_features(batch["pixel_values"].to(torch.bfloat16)).pooler_output
        ref64 = ref64_model.model.get_image_features(batch["pixel_values"].double()).pooler_output
        out = enc(imgs, project=low.model.multi_modal_projector)
    mine = torch.cat([out.tokens[i, :n] for i, n in enumerate(out.num_tokens)])
    assert mine.dtype == torch.bfloat16
    d = ref.shape[-1]
    assert_close_to_reference(mine, ref.reshape(-1, d), ref64.reshape(-1, d), dtype=torch.bfloat16, name="bf16 tokens")
