"""The ``llava_onevision`` and ``internvl`` recipes against transformers' own processors and models, end to end.

Tiny random models built offline (width 32, 2 layers) at the real tile sizes: OneVision's SigLIP 384/14
(27 x 27 tokens, the patch conv drops the last 6 px) and InternViT 448/14 (32 x 32 tokens). The references
are transformers' default (torchvision) image processors and the models' own feature code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hrperc
from hrperc.ops.anyres import ONEVISION_PINPOINTS

transformers = pytest.importorskip("transformers")
from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas  # noqa: E402
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches  # noqa: E402

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
ATOL = 1e-5


def _image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed * 100003 + h * 7919 + w)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def _tiny_text():
    return transformers.Qwen2Config(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
    )


# --- LLaVA-OneVision -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onevision():
    torch.manual_seed(0)
    vision = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=384, patch_size=14
    )
    cfg = transformers.LlavaOnevisionConfig(vision_config=vision, text_config=_tiny_text())
    # The reference settings are the config's defaults (those of the released OneVision checkpoints).
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-1, "full")
    assert cfg.vision_aspect_ratio == "anyres_max_9"
    assert [tuple(p) for p in cfg.image_grid_pinpoints] == list(ONEVISION_PINPOINTS)
    model = transformers.LlavaOnevisionForConditionalGeneration(cfg).eval()
    proc = transformers.LlavaOnevisionImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3)  # SigLIP's
    assert proc.size == {"height": 384, "width": 384}
    assert [tuple(p) for p in proc.image_grid_pinpoints] == list(ONEVISION_PINPOINTS)
    enc = hrperc.create_encoder("llava_onevision", model.model.vision_tower)
    assert enc.backbone.mean == (0.5, 0.5, 0.5) and enc.backbone.std == (0.5, 0.5, 0.5)
    assert (enc.backbone.image_size, enc.backbone.patch_size, enc.tile_tokens) == ((384, 384), (14, 14), (27, 27))
    return model, proc, enc


def _onevision_counter(proc):
    from transformers import LlavaOnevisionProcessor

    counter = object.__new__(LlavaOnevisionProcessor)  # the counting code only, without a tokenizer
    counter.image_processor = proc
    counter.num_image_tokens, counter.vision_aspect_ratio = 729, "anyres_max_9"
    counter.vision_feature_select_strategy = "full"
    return counter


def _onevision_reference(model, proc, img):
    """Processor pixels -> vision tower hidden_states[-1] (all tokens), split per image; and a packer of them."""
    batch = proc(img, return_tensors="pt")
    sizes = batch["image_sizes"]
    n = image_size_to_num_patches(sizes[0], model.config.image_grid_pinpoints, 384)
    pixels = batch["pixel_values"][0, :n]
    with torch.no_grad():
        feats = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]

    def pack(newline):
        with torch.no_grad():
            packed, lengths = model.model.pack_image_features(
                [feats], sizes, image_newline=newline, vision_aspect_ratio="anyres_max_9"
            )
        assert lengths.tolist() == [packed[0].shape[0]]
        return packed[0]

    return pack, pixels


ONEVISION_SIZES = [(200, 150), (333, 777), (40, 900), (1100, 1500)]  # (1100, 1500): 3 x 4 tiles, shrunk


@pytest.mark.parametrize("size", ONEVISION_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_onevision_tokens_equal_pack_image_features(onevision, size):
    model, proc, enc = onevision
    img = _image(*size)
    D = enc.backbone.hidden_size
    pack, ref_pixels = _onevision_reference(model, proc, img)
    ref = pack(torch.zeros(D))
    with torch.no_grad():
        out = enc(img)
    n = enc.num_tokens(size)
    assert out.tokens.shape == (1, n, D) and out.num_tokens == [n] == [ref.shape[0]]
    assert n == _onevision_counter(proc)._get_number_of_features(*size, 384, 384)  # the placeholder count
    assert out.plans[0].views == ref_pixels.shape[0]
    torch.testing.assert_close(out.tokens[0], ref, rtol=0, atol=ATOL)
    # The slots are where the model puts image_newline: with a random newline both agree too.
    nl = torch.randn(D)
    torch.testing.assert_close(torch.where(out.slot_mask[0, :, None], nl, out.tokens[0]), pack(nl), rtol=0, atol=ATOL)
    unshrunk = hrperc.create_encoder("llava_onevision", enc.backbone, max_tiles=None).num_tokens(size)
    assert (n < unshrunk) == (size == (1100, 1500))  # the anyres_max_9 shrink is exercised (and only there)


def test_onevision_num_tokens_equals_the_processor_count():
    proc = transformers.LlavaOnevisionImageProcessor()
    counter = _onevision_counter(proc)
    cfg = transformers.SiglipVisionConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=1, image_size=384, patch_size=14
    )
    enc = hrperc.create_encoder("llava_onevision", transformers.SiglipVisionModel(cfg))
    rng = np.random.default_rng(0)
    sizes = [tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(300)]
    sizes += [(40, 900), (900, 40), (2000, 3000), (4000, 4000), (384, 384), (1, 1), (383, 385), (6000, 300)]
    for h, w in sizes:
        assert enc.num_tokens((h, w)) == counter._get_number_of_features(h, w, 384, 384), (h, w)


def test_onevision_project_and_newline_equal_get_image_features(onevision):
    model, proc, enc = onevision
    sizes = [(1100, 1500), (333, 777)]  # a ragged batch; the first is shrunk (after the projector)
    imgs = [_image(*s, seed=1) for s in sizes]
    batch = proc(imgs, return_tensors="pt")
    mm = model.model
    with torch.no_grad():
        ref = mm.get_image_features(
            batch["pixel_values"],
            batch["image_sizes"],
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
        ).pooler_output
        out = enc(imgs, project=mm.multi_modal_projector, newline=mm.image_newline)
        plain = enc(imgs)
    assert out.tokens.shape[-1] == model.config.text_config.hidden_size
    for b, size in enumerate(sizes):
        n = out.num_tokens[b]
        assert n == ref[b].shape[0] == enc.num_tokens(size)
        torch.testing.assert_close(out.tokens[b, :n], ref[b], rtol=0, atol=ATOL)
        assert not out.tokens[b, n:].any()
    # The order matters where the map is shrunk: projecting after the bilinear shrink is not the model.
    b, n = 0, out.num_tokens[0]
    keep = ~out.slot_mask[b, :n]
    late = mm.multi_modal_projector(plain.tokens[b, :n][keep])
    assert (late - ref[b][keep]).abs().max() > 1e-4  # 2.4e-3 here; the orders agree to 1e-8 where unshrunk
    b, n = 1, out.num_tokens[1]  # unshrunk: the projector is per token, both orders agree
    keep = ~out.slot_mask[b, :n]
    with torch.no_grad():
        late = mm.multi_modal_projector(plain.tokens[b, :n][keep])
    torch.testing.assert_close(late, ref[b][keep], rtol=0, atol=ATOL)


def test_onevision_pixels_are_the_processors(onevision):
    from PIL import Image
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    model, proc, enc = onevision
    size = (333, 777)
    img = _image(*size, seed=2)
    tv = proc(img, return_tensors="pt")["pixel_values"][0]
    pil_proc = LlavaOnevisionImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    pil = pil_proc(Image.fromarray(img.permute(1, 2, 0).numpy()), return_tensors="pt")["pixel_values"][0]
    views = enc.backbone.normalize(enc.frontend.views(img[None], enc.view_plan(size))[0])
    assert views.shape == tv.shape == pil.shape
    gap = (tv - pil).abs().max().item()
    err = (views - tv).abs().max().item()
    assert err <= 2 * gap + 1e-5, (err, gap)  # the house preprocessing tolerance
    assert err <= 1e-6, err  # and the same steps as the torchvision backend: float-rounding exact


# --- InternVL ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def internvl():
    torch.manual_seed(0)
    vision = transformers.InternVLVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=448, patch_size=14
    )
    cfg = transformers.InternVLConfig(vision_config=vision, text_config=_tiny_text())
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy, cfg.downsample_ratio) == (-1, "default", 0.5)
    model = transformers.InternVLForConditionalGeneration(cfg).eval()
    tower = model.model.vision_tower
    with torch.no_grad():  # the checkpoint-free init zeroes these; random values make the checks bite
        tower.embeddings.cls_token.normal_()
        if tower.embeddings.position_embeddings is not None:
            tower.embeddings.position_embeddings.normal_()
    enc = hrperc.create_encoder("internvl", tower)
    assert enc.backbone.mean == pytest.approx(IMAGENET_MEAN) and enc.backbone.std == pytest.approx(IMAGENET_STD)
    assert enc.tile_tokens == (32, 32)
    proc = transformers.GotOcr2ImageProcessor(
        crop_to_patches=True,
        size={"height": 448, "width": 448},
        max_patches=12,
        min_patches=1,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    return model, proc, enc


def _internvl_reference(model, pixels):
    """get_image_features before the projector: last_hidden_state[:, 1:] -> pixel_shuffle(0.5) -> (V*256, 4D)."""
    with torch.no_grad():
        x = model.model.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]
        v = x.shape[0]
        x = model.model.pixel_shuffle(x.reshape(v, 32, 32, -1), scale_factor=0.5)
    return x.reshape(v * 256, -1)


# (448, 448): one tile, no thumbnail; (500, 500) / (700, 700) and (448, 896) / (700, 1400): same-aspect ties,
# broken by area ((1, 1) vs (2, 2), (1, 2) vs (2, 4)); (40, 900): 1 x 12, extreme.
INTERNVL_SIZES = {
    (448, 448): (1, 1),
    (500, 500): (1, 1),
    (700, 700): (2, 2),
    (448, 896): (1, 2),
    (700, 1400): (2, 4),
    (300, 500): (2, 3),
    (40, 900): (1, 12),
}


@pytest.mark.parametrize("size", list(INTERNVL_SIZES), ids=lambda s: f"{s[0]}x{s[1]}")
def test_internvl_tokens_equal_the_model(internvl, size):
    model, proc, enc = internvl
    img = _image(*size)
    batch = proc(img, return_tensors="pt")
    num_patches = int(batch["num_patches"][0])
    cols, rows = get_optimal_tiled_canvas(size, (448, 448), 1, 12)
    assert (rows, cols) == INTERNVL_SIZES[size]  # the sizes test what they say
    assert num_patches == rows * cols + (rows * cols > 1)  # a thumbnail only with more than one tile
    with torch.no_grad():
        out = enc(img)
    plan = out.plans[0]
    assert plan.grid == (rows, cols) and plan.views == num_patches
    assert out.num_tokens == [enc.num_tokens(size)] == [256 * num_patches]
    assert out.tokens.shape == (1, 256 * num_patches, 4 * 32)
    torch.testing.assert_close(out.tokens[0], _internvl_reference(model, batch["pixel_values"]), rtol=0, atol=ATOL)


def test_internvl_num_tokens_equals_the_processor_count(internvl):
    _, proc, enc = internvl
    rng = np.random.default_rng(1)
    sizes = [tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(300)]
    sizes += [(1, 1), (40, 900), (900, 40), (448, 448), (449, 447), (1000, 1000)] + list(INTERNVL_SIZES)
    for h, w in sizes:
        assert enc.num_tokens((h, w)) == 256 * proc.get_number_of_image_patches(h, w), (h, w)


def test_internvl_project_equals_get_image_features(internvl):
    model, proc, enc = internvl
    sizes = [(700, 700), (448, 448)]
    imgs = [_image(*s, seed=3) for s in sizes]
    batch = proc(imgs, return_tensors="pt")
    with torch.no_grad():
        pooled = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        out = enc(imgs, project=model.model.multi_modal_projector)
    per_image = pooled.split(batch["num_patches"].tolist())
    assert out.tokens.shape[-1] == model.config.text_config.hidden_size
    for b, ref in enumerate(per_image):
        n = out.num_tokens[b]
        assert n == ref.shape[0] * ref.shape[1]
        torch.testing.assert_close(out.tokens[b, :n], ref.reshape(n, -1), rtol=0, atol=ATOL)
        assert not out.tokens[b, n:].any()


def test_internvl_ragged_batch_is_one_backbone_pass(internvl, monkeypatch):
    model, _, _ = internvl
    enc = hrperc.create_encoder("internvl", model.model.vision_tower, max_batch=1000)
    sizes = [(300, 500), (448, 448), (448, 896), (300, 500)]
    imgs = [_image(*s, seed=4 + i) for i, s in enumerate(sizes)]
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
    views = [enc.view_plan(s).views for s in sizes]
    assert views == [7, 1, 3, 7]
    assert calls == [sum(views)] and out.encoded["encoded"] == sum(views)
    assert out.num_tokens == [s.num_tokens[0] for s in singles] == [256 * v for v in views]
    for b, single in enumerate(singles):
        n = out.num_tokens[b]
        torch.testing.assert_close(out.tokens[b, :n], single.tokens[0], rtol=0, atol=ATOL)
        assert out.token_mask[b].tolist() == [True] * n + [False] * (out.tokens.shape[1] - n)
        assert not out.tokens[b, n:].any()


# --- the DCM+DEM upgrade ------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe,size", [("llava_onevision", (333, 777)), ("internvl", (300, 500))])
def test_dcm_keeps_the_count_and_trains_only_the_dem(onevision, internvl, recipe, size):
    model = (onevision if recipe == "llava_onevision" else internvl)[0]
    tower = model.model.vision_tower
    plain = hrperc.create_encoder(recipe, tower)
    enc = hrperc.create_encoder(recipe, tower, dcm=True)
    assert plain.dem is None and enc.dem is not None
    for s in [(200, 150), (333, 777), (40, 900), (1100, 1500), (700, 700), (448, 448), (2000, 3000), (5000, 100)]:
        assert enc.num_tokens(s) == plain.num_tokens(s), s
        n = enc.view_plan(s).grid[0] * enc.view_plan(s).grid[1]
        assert enc.view_plan(s).views == plain.view_plan(s).views + n  # the strided views of the same tiles
    out = enc(_image(*size, seed=5))
    n, width = enc.num_tokens(size), enc.backbone.hidden_size * (4 if recipe == "internvl" else 1)
    assert out.tokens.shape == (1, n, width) and out.num_tokens == [n]
    assert out.tokens.requires_grad
    out.tokens.sum().backward()
    dem_params = [p for p in enc.dem.parameters() if p.requires_grad]
    assert dem_params and all(p.grad is not None for p in dem_params)
    assert any(p.grad.abs().sum() > 0 for p in dem_params)
    assert all(p.grad is None for p in tower.parameters())  # the backbone stays frozen
