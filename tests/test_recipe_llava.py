"""The ``llava15`` and ``llava_next`` recipes against transformers' own processors and models.

Tiny random LLaVA / LLaVA-NeXT models built offline (CLIP tower of width 32 and 3 layers, but the real
336 px tiles and 14 px patches), fed by transformers' default (torchvision-backend) image processors:
hrperc's pixels must equal the processor's ``pixel_values`` (the house tolerance rule, against the gap
to the PIL backend, and float-rounding exact since both take the same steps), and its tokens must equal
what the model computes before its projector -- ``hidden_states[-2]`` without CLS (LLaVA-1.5), then
``pack_image_features`` (LLaVA-NeXT) -- and, with ``project=``/``newline=``, ``get_image_features``.
"""

from __future__ import annotations

import pytest
import torch

import hrperc
from hrperc.ops import anyres

transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil  # noqa: E402
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil  # noqa: E402
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches  # noqa: E402

TILE, PATCH, D = 336, 14, 32
FEATURE_ATOL = 1e-5  # tokens of the same model on pixels equal up to float rounding
PIXEL_ATOL = 1e-6  # hrperc takes the torchvision backend's steps: equal up to float rounding
LLAVA15_SIZES = [(200, 300), (333, 500), (1000, 700), (50, 1000)]
# Under one tile (200x150), an extreme 1:22 strip (40x900), odd sizes, and one near the largest pinpoint.
NEXT_SIZES = [(200, 150), (40, 900), (333, 500), (700, 1000)]


def _configs():
    vision = CLIPVisionConfig(
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=TILE,
        patch_size=PATCH,
    )
    text = LlamaConfig(
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=100,
    )
    return vision, text


@pytest.fixture(scope="module")
def llava():
    torch.manual_seed(0)
    vision, text = _configs()
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=99))
    assert (model.config.vision_feature_layer, model.config.vision_feature_select_strategy) == (-2, "default")
    return model.eval()


@pytest.fixture(scope="module")
def llava_next():
    torch.manual_seed(0)
    vision, text = _configs()
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=99)
    model = LlavaNextForConditionalGeneration(config)
    assert (model.config.vision_feature_layer, model.config.vision_feature_select_strategy) == (-2, "default")
    assert model.config.image_grid_pinpoints == [list(p) for p in anyres.LLAVA_NEXT_PINPOINTS]
    with torch.no_grad():  # a model's learned newline (random here, transformers initializes it so too)
        model.model.image_newline.copy_(torch.randn(D))
    return model.eval()


_LLAVA15_KW = dict(do_pad=True, size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE})
_NEXT_KW = dict(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE})


def _image(h, w, seed):
    """A uint8 (3, h, w) photo-like image: smooth colour fields plus noise (edges and texture for the resize)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, h // 16 + 2, w // 16 + 2, generator=g) * 255
    smooth = torch.nn.functional.interpolate(coarse, (h, w), mode="bilinear", align_corners=False)[0]
    noisy = smooth + torch.randn(3, h, w, generator=g) * 25
    return noisy.round().clamp(0, 255).to(torch.uint8)


def _pil(img):
    return Image.fromarray(img.permute(1, 2, 0).numpy())


def _max_abs(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def _assert_pixels(ours, ref, ref_pil, name):
    """The house tolerance rule against the PIL-backend gap, and float-rounding exactness (same steps)."""
    err, gap = _max_abs(ours, ref), _max_abs(ref, ref_pil)
    assert err <= 2 * gap + 1e-5, f"{name}: |hrperc - transformers| = {err:.3g} > 2 x PIL gap {gap:.3g} + 1e-5"
    assert err <= PIXEL_ATOL, f"{name}: |hrperc - transformers| = {err:.3g}; the same steps should agree to 1e-6"


def _hrperc_pixels(enc, img):
    """The normalized views hrperc feeds the ViT for one uint8 (3, H, W) image."""
    plan = enc.view_plan(tuple(img.shape[-2:]))
    return enc.backbone.normalize(enc.frontend.views(img[None], plan).flatten(0, 1))


class _PassCounter:
    """Counts the vision tower's embedding calls (one per batched ViT pass) and the views in each."""

    def __init__(self, tower):
        self.batches: list[int] = []
        self.handle = tower.embeddings.register_forward_hook(lambda m, args, out: self.batches.append(out.shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# --- llava15 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", LLAVA15_SIZES)
def test_llava15_pixels_equal_llava_image_processor(llava, size):
    enc = hrperc.create_encoder("llava15", llava.model.vision_tower)
    proc, proc_pil = LlavaImageProcessor(**_LLAVA15_KW), LlavaImageProcessorPil(**_LLAVA15_KW)
    img = _image(*size, seed=size[0])
    ref = proc(img, return_tensors="pt").pixel_values
    ref_from_pil = proc(_pil(img), return_tensors="pt").pixel_values
    ref_pil = proc_pil(_pil(img), return_tensors="pt").pixel_values
    assert torch.equal(ref, ref_from_pil)  # the processor reads a PIL image and its uint8 tensor alike
    ours = _hrperc_pixels(enc, img)
    assert ours.shape == ref.shape == (1, 3, TILE, TILE)
    _assert_pixels(ours, ref, ref_pil, f"llava15 {size}")


def test_llava15_tokens_equal_the_model_features(llava):
    """Single images (uint8 and PIL) and a ragged list: the tower's layer -2 without CLS, one ViT pass."""
    tower = llava.model.vision_tower
    enc = hrperc.create_encoder("llava15", tower, max_batch=1000)
    proc = LlavaImageProcessor(**_LLAVA15_KW)
    images = [_image(*s, seed=s[0]) for s in LLAVA15_SIZES]
    pixel_values = proc(images, return_tensors="pt").pixel_values
    with torch.no_grad():
        hidden = tower(pixel_values, output_hidden_states=True).hidden_states
        ref = hidden[llava.config.vision_feature_layer][:, 1:]
        # The backbone alone on the processor's own pixels: the same model computation, to float rounding.
        assert _max_abs(enc.backbone.features(pixel_values), ref) <= PIXEL_ATOL  # 0.0 on CPU
        with _PassCounter(tower) as passes:
            batch = enc([images[0], _pil(images[1]), images[2], _pil(images[3])])
        single = enc(images[1])
        single_pil = enc(_pil(images[1]))
    assert passes.batches == [len(images)]  # the ragged batch: one batched ViT pass
    assert batch.tokens.shape == (len(images), 576, D) and batch.num_tokens == [576] * len(images)
    assert batch.token_mask.all() and not batch.slot_mask.any()
    for b, size in enumerate(LLAVA15_SIZES):
        assert enc.num_tokens(size) == 576
        err = _max_abs(batch.tokens[b], ref[b])
        assert err <= FEATURE_ATOL, f"llava15 {size}: tokens differ from the model's features by {err:.3g}"
    assert torch.equal(single.tokens, single_pil.tokens)
    assert _max_abs(single.tokens[0], ref[1]) <= FEATURE_ATOL


def test_llava15_count_and_projector_equal_the_model(llava):
    tower, projector = llava.model.vision_tower, llava.model.multi_modal_projector
    enc = hrperc.create_encoder("llava15", tower)
    proc = object.__new__(LlavaProcessor)  # the counting code only, without a tokenizer
    proc.patch_size, proc.num_additional_image_tokens, proc.vision_feature_select_strategy = PATCH, 1, "default"
    proc.image_token = "<image>"
    images = [_image(*s, seed=s[1]) for s in LLAVA15_SIZES[:2]]
    inputs = LlavaImageProcessor(**_LLAVA15_KW)(images, return_tensors="pt")
    for b, size in enumerate(LLAVA15_SIZES[:2]):
        placeholders = proc.replace_image_token(inputs, b).count("<image>")
        assert enc.num_tokens(size) == placeholders == 576
    with torch.no_grad():
        ref = llava.model.get_image_features(pixel_values=inputs.pixel_values).pooler_output
        ours = enc(images, project=projector).tokens
    assert isinstance(ref, list) and len(ref) == len(images)
    for b in range(len(images)):
        assert ours[b].shape == ref[b].shape == (576, D)
        assert _max_abs(ours[b], ref[b]) <= FEATURE_ATOL


# --- llava_next ------------------------------------------------------------------------------------
def _next_reference(model, images, newlines):
    """transformers' LLaVA-NeXT tokens before the projector: processor -> tower layer -2, CLS dropped ->
    pack_image_features, once per newline of ``newlines`` (in the newline slots; one tower pass for all).
    Returns ([packed per image, per newline], inputs, patches)."""
    inputs = LlavaNextImageProcessor(**_NEXT_KW)(images, return_tensors="pt")
    pinpoints = model.config.image_grid_pinpoints
    patches = [image_size_to_num_patches(s, pinpoints, TILE) for s in inputs.image_sizes.tolist()]
    flat = torch.cat([pv[:n] for pv, n in zip(inputs.pixel_values, patches)])
    with torch.no_grad():
        hidden = model.model.vision_tower(flat, output_hidden_states=True).hidden_states[-2][:, 1:]
        packs = [
            model.model.pack_image_features(
                list(torch.split(hidden, patches)), inputs.image_sizes, "default", image_newline=newline
            )
            for newline in newlines
        ]
    for packed, lens in packs:
        assert lens.tolist() == [p.shape[0] for p in packed]
    return [packed for packed, _ in packs], inputs, patches


def _next_count(h, w):
    proc = object.__new__(LlavaNextProcessor)  # the counting code only, without a tokenizer
    proc.image_processor = LlavaNextImageProcessor(**_NEXT_KW)
    proc.patch_size, proc.num_additional_image_tokens, proc.vision_feature_select_strategy = PATCH, 1, "default"
    proc.image_token = "<image>"
    inputs = {"image_sizes": [[h, w]], "pixel_values": [[torch.zeros(3, TILE, TILE)]]}
    return proc.replace_image_token(inputs, 0).count("<image>")


def test_llava_next_pixels_equal_llava_next_image_processor(llava_next):
    enc = hrperc.create_encoder("llava_next", llava_next.model.vision_tower)
    proc, proc_pil = LlavaNextImageProcessor(**_NEXT_KW), LlavaNextImageProcessorPil(**_NEXT_KW)
    pinpoints = llava_next.config.image_grid_pinpoints
    for size in NEXT_SIZES:
        img = _image(*size, seed=size[1])
        ref = proc(img, return_tensors="pt").pixel_values[0]
        ref_pil = proc_pil(_pil(img), return_tensors="pt").pixel_values[0]
        n = image_size_to_num_patches(size, pinpoints, TILE)
        assert enc.num_backbone_passes(size) == enc.view_plan(size).views == n == ref.shape[0]
        _assert_pixels(_hrperc_pixels(enc, img), ref, ref_pil, f"llava_next {size}")


def test_llava_next_ragged_batch_equals_pack_image_features(llava_next):
    """Tokens, counts, the newline slots and one batched ViT pass, for a ragged list (one item a PIL image)."""
    tower = llava_next.model.vision_tower
    enc = hrperc.create_encoder("llava_next", tower, max_batch=1000)
    images = [_image(*s, seed=s[0] + s[1]) for s in NEXT_SIZES]
    newline = torch.randn(D)
    (packed, packed_nl), inputs, patches = _next_reference(llava_next, images, (torch.zeros(D), newline))
    # Where pack_image_features puts the newline: pack zeros with a ones newline.
    zeros = [torch.zeros(n, (TILE // PATCH) ** 2, D) for n in patches]
    marks, _ = llava_next.model.pack_image_features(zeros, inputs.image_sizes, "default", image_newline=torch.ones(D))
    given = [images[0], _pil(images[1]), images[2], images[3]]
    with torch.no_grad():
        with _PassCounter(tower) as passes:
            out = enc(given)
        filled = enc(given, newline=newline)
        singles = [enc(img) for img in images]
    assert passes.batches == [sum(patches)] and out.encoded["encoded"] == sum(patches)
    lens = [p.shape[0] for p in packed]
    assert out.num_tokens == lens and out.tokens.shape == (len(images), max(lens), D)
    for b, size in enumerate(NEXT_SIZES):
        n = lens[b]
        assert enc.num_tokens(size) == n == _next_count(*size), size
        assert out.token_mask[b].tolist() == [True] * n + [False] * (max(lens) - n)
        assert out.slot_mask[b, :n].tolist() == (marks[b][:, 0] == 1).tolist() and not out.slot_mask[b, n:].any()
        assert marks[b][:, 0].sum() == out.plans[b].anyres.unpadded[0]  # one newline per unpadded row
        err = _max_abs(out.tokens[b, :n], packed[b])
        assert err <= FEATURE_ATOL, f"llava_next {size}: tokens differ from pack_image_features by {err:.3g}"
        assert _max_abs(filled.tokens[b, :n], packed_nl[b]) <= FEATURE_ATOL
        assert not out.tokens[b, n:].any() and not filled.tokens[b, n:].any()
        assert _max_abs(singles[b].tokens[0], out.tokens[b, :n]) <= FEATURE_ATOL


def test_llava_next_num_tokens_equals_the_processor_count():
    """Counts only (no pixels): the encoder's count is the processor's placeholder count, CLS dropped."""
    vision, _ = _configs()
    enc = hrperc.create_encoder("llava_next", CLIPVisionModel(vision))  # the counts read its geometry only
    sizes = [(1, 1), (200, 150), (336, 336), (337, 673), (40, 900), (900, 40), (672, 672), (1008, 336), (2000, 3000)]
    sizes += [(h, w) for h in (57, 333, 480, 719, 1500) for w in (91, 500, 640, 1001, 4000)]
    for size in sizes:
        assert enc.num_tokens(size) == _next_count(*size), size


def test_llava_next_tie_break_original_changes_small_images(llava_next):
    tower = llava_next.model.vision_tower
    default = hrperc.create_encoder("llava_next", tower)
    original = hrperc.create_encoder("llava_next", tower, tie_break="original")
    size = (200, 300)
    grid_default, grid_original = default.view_plan(size).grid, original.view_plan(size).grid
    assert grid_default != grid_original
    assert default.num_tokens(size) == _next_count(*size)
    expected = anyres.num_tokens(size, tile_size=TILE, patch_size=PATCH, tie_break="original")
    assert original.num_tokens(size) == expected != default.num_tokens(size)
    canvas = anyres.select_resolution(size, tie_break="original")
    assert grid_original == (canvas[0] // TILE, canvas[1] // TILE)
    with torch.no_grad():
        out = original(_image(*size, seed=3))
    assert out.num_tokens == [expected] and out.tokens.shape == (1, expected, D)
    assert out.encoded["encoded"] == 1 + grid_original[0] * grid_original[1]
    # Big images are no tie: both readings agree.
    assert default.view_plan((1000, 700)).grid == original.view_plan((1000, 700)).grid


def test_llava_next_projector_path_equals_get_image_features(llava_next):
    """What an integration runs: project= the model's projector, newline= its image_newline."""
    model = llava_next.model
    enc = hrperc.create_encoder("llava_next", model.vision_tower)
    images = [_image(*s, seed=7 * s[0]) for s in NEXT_SIZES[:3]]
    inputs = LlavaNextImageProcessor(**_NEXT_KW)(images, return_tensors="pt")
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=inputs.pixel_values, image_sizes=inputs.image_sizes).pooler_output
        out = enc(images, project=model.multi_modal_projector, newline=model.image_newline)
    assert isinstance(ref, list) and len(ref) == len(images)
    assert out.num_tokens == [r.shape[0] for r in ref]
    for b, size in enumerate(NEXT_SIZES[:3]):
        n = ref[b].shape[0]
        err = _max_abs(out.tokens[b, :n], ref[b])
        assert err <= FEATURE_ATOL, f"llava_next {size}: projected tokens differ from get_image_features by {err:.3g}"
        slots = out.slot_mask[b, :n]
        assert slots.any() and torch.equal(out.tokens[b, :n][slots], model.image_newline.expand(int(slots.sum()), D))
