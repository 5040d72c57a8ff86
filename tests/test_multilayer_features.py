"""Several layers concatenated on the channels (``layer=[-2, -5, -8]``, a list ``vision_feature_layer``) and the
class token kept (``select_strategy="full"``) on the LLaVA recipes: the backbones' one-pass read, the recipes'
counts and tokens, and exactness against transformers' LLaVA / LLaVA-NeXT models built offline."""

from __future__ import annotations

import pytest
import torch

tf = pytest.importorskip("transformers")

from _hf_tiny import _VISION, _images, _text_config, _tokenizer  # noqa: E402
from _messages import FIX, raises_naming  # noqa: E402
from open_clip.transformer import VisionTransformer as OpenClipViT  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

import hrperc  # noqa: E402
from hrperc.backbones import VisionBackbone  # noqa: E402
from hrperc.integrations.transformers import attach, encoder_from_model, load_front_end, save_front_end  # noqa: E402
from hrperc.ops import anyres  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only wait on each other


def _clip(layers: int = 4, image_size: int = 28):
    torch.manual_seed(0)
    cfg = tf.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=14,
    )
    return tf.CLIPVisionModel(cfg).eval()


class _BlockCalls:
    """Counts the calls of each block of a transformers CLIP tower."""

    def __init__(self, tower) -> None:
        blocks = getattr(tower, "vision_model", tower).encoder.layers  # transformers 5 flattens the tower
        self.calls = [0] * len(blocks)
        self.handles = [
            block.register_forward_hook(lambda *_, i=i: self.calls.__setitem__(i, self.calls[i] + 1))
            for i, block in enumerate(blocks)
        ]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


# --- backbones ---------------------------------------------------------------------------------------------
def test_hf_layers_concatenate_hidden_states_in_the_given_order_from_one_pass():
    tower = _clip(layers=4)
    bb = hrperc.wrap_backbone(tower)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        hs = tower(x, output_hidden_states=True).hidden_states
        with _BlockCalls(tower) as counted:
            several = bb.features(x, layer=[-2, 1, 2])  # blocks 3, 1, 2: not sorted
        assert counted.calls == [1, 1, 1, 0]  # one pass, up to the deepest block read; block 4 never runs
        full = bb.features(x, layer=[-1, 2], prefix=True)
        one = bb.features(x, layer=-2)
    assert several.shape == (2, 4, 96) and full.shape == (2, 5, 64)
    assert torch.equal(several, torch.cat([hs[3][:, 1:], hs[1][:, 1:], hs[2][:, 1:]], -1))
    assert torch.equal(full, torch.cat([hs[4], hs[2]], -1))  # the class token first, in every layer
    assert torch.equal(one, hs[-2][:, 1:])  # one int: the patch tokens, as before
    assert bb.feature_width([-1, 2]) == 64 and bb.feature_width() == 32


@pytest.mark.parametrize("kind", ["timm", "open_clip"])
def test_timm_and_open_clip_layers_equal_their_single_layers(kind):
    torch.manual_seed(0)
    if kind == "timm":  # two register tokens too: every prefix token is kept, first
        model = VisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=4, num_heads=2, reg_tokens=2)
    else:
        model = OpenClipViT(image_size=28, patch_size=14, width=32, layers=4, heads=2, mlp_ratio=4.0)
    bb = hrperc.wrap_backbone(model.eval())
    p = bb.num_prefix_tokens
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        several = bb.features(x, layer=[3, -4])
        full = bb.features(x, layer=[3, -4], prefix=True)
        singles = [bb.features(x, layer=k) for k in (3, 1)]
    assert several.shape == (2, 4, 64) and full.shape == (2, p + 4, 64)
    assert torch.equal(several, torch.cat(singles, -1))
    assert torch.equal(full[:, p:], several)
    assert not torch.equal(full[:, :p, :32], full[:, :p, 32:])  # the prefix tokens of each layer, not one copy


@pytest.mark.parametrize(
    "layer, fragments",
    [
        ([-2, 3], ("layer=[-2, 3]", "block 3 twice")),
        ([-1, -5], ("layer=[-1, -5]", "-5", "1..4")),
        ([-1, 0], ("layer=[-1, 0]", "layer=0")),
        ([], ("layer=[]",)),
    ],
)
def test_a_repeated_or_out_of_range_layer_is_refused(layer, fragments):
    bb = hrperc.wrap_backbone(_clip(layers=4))
    with raises_naming(ValueError, *fragments, FIX):
        bb.features(torch.randn(1, 3, 28, 28), layer=layer)
    with raises_naming(ValueError, *fragments, FIX):
        hrperc.create_encoder("llava15", bb, layer=layer)
    with raises_naming(TypeError, "layer=[-1, 'x']", "'x'", FIX):
        hrperc.create_encoder("llava15", bb, layer=[-1, "x"])


def test_a_backbone_that_reads_one_layer_refuses_a_list_at_construction():
    class OneLayer(VisionBackbone):  # a user's adapter without _hidden_states
        def _patch_tokens(self, pixels, k):
            return pixels.new_zeros(pixels.shape[0], 4, 8)

    kw = dict(image_size=(28, 28), patch_size=(14, 14), hidden_size=8, num_layers=3, num_prefix_tokens=1, mean=(0,) * 3)
    bb = OneLayer(torch.nn.Linear(1, 1), std=(1,) * 3, **kw)
    with raises_naming(ValueError, "layer=[-1, -2]", "OneLayer", FIX):
        hrperc.HighResEncoder(bb, layer=[-1, -2])
    with raises_naming(ValueError, "prefix=True", "OneLayer", FIX):
        hrperc.create_encoder("llava15", bb, select_strategy="full")


# --- recipes -----------------------------------------------------------------------------------------------
def test_llava15_full_and_layers_tokens_and_counts():
    bb = hrperc.wrap_backbone(_clip(layers=4, image_size=56))
    enc = hrperc.create_encoder("llava15", bb, select_strategy="full", layer=[-1, -3])
    images = _images([(40, 90), (70, 30)])
    with torch.no_grad():
        out = enc(images)
        alone = enc(images[1])
        parts = [hrperc.create_encoder("llava15", bb, select_strategy="full", layer=k)(images) for k in (-1, -3)]
        patches = hrperc.create_encoder("llava15", bb, layer=[-1, -3])(images)
    assert enc.token_width == 64 and enc.num_tokens((40, 90)) == 1 + 16 and out.tokens.shape == (2, 17, 64)
    assert [s.source for s in enc.plan((40, 90)).layout] == ["prefix", "image"]
    assert torch.equal(out.tokens, torch.cat([p.tokens for p in parts], -1))  # layers concatenated, in order
    assert torch.equal(out.tokens[:, 1:], patches.tokens)  # "full": the class token, then the "default" tokens
    torch.testing.assert_close(alone.tokens[0], out.tokens[1], rtol=0, atol=1e-6)  # ragged batch = alone
    assert enc.recipe_options == {"select_strategy": "full", "layer": [-1, -3]}


def test_llava_next_layers_with_dcm_and_the_full_strategy_by_tower():
    bb = hrperc.wrap_backbone(_clip(layers=3, image_size=28))
    enc = hrperc.create_encoder("llava_next", bb, layer=[-1, 1], dcm=True)
    assert enc.token_width == 64 and enc.dem.dim == 64  # the DEM runs at the concatenated width
    images = _images([(50, 70), (30, 30)])
    with torch.no_grad():
        out = enc(images)
    assert out.tokens.shape[-1] == 64 and out.num_tokens == [enc.num_tokens(s) for s in ((50, 70), (30, 30))]
    plain = hrperc.create_encoder("llava_next", bb, layer=[-1, 1])
    with torch.no_grad():
        ref = [hrperc.create_encoder("llava_next", bb, layer=k)(images).tokens for k in (-1, 1)]
        assert torch.equal(plain(images).tokens, torch.cat(ref, -1))
    for recipe in ("llava_next", "llava_onevision"):  # a CLIP tower's class token has no place in a tile
        with raises_naming(ValueError, "select_strategy='full'", "2 x 2", "'default'", FIX):
            hrperc.create_encoder(recipe, bb, select_strategy="full")
    with raises_naming(ValueError, "select_strategy='cls'", "'full'", FIX):
        hrperc.create_encoder("llava15", bb, select_strategy="cls")
    torch.manual_seed(0)
    siglip = tf.SiglipVisionModel(tf.SiglipVisionConfig(image_size=28, **{**_VISION, "num_hidden_layers": 2}))
    one = hrperc.create_encoder("llava_onevision", siglip.eval(), select_strategy="full")  # no class token: kept
    with torch.no_grad():
        assert torch.equal(one(images).tokens, hrperc.create_encoder("llava_onevision", siglip)(images).tokens)


# --- against transformers ----------------------------------------------------------------------------------
#: the tiny LLaVA towers' side: 4 x 4 patches of 14 px (the layer lists read the same at the released 336)
TILE = 56


def _llava(family: str, layer, strategy: str, layers: int = 3):
    """A tiny CLIP-tower LLaVA / LLaVA-NeXT with ``vision_feature_layer=layer`` and its real processor
    (``TILE`` px tiles; LLaVA-NeXT's pinpoints scaled to them)."""
    tok = _tokenizer()
    torch.manual_seed(0)
    vision = tf.CLIPVisionConfig(image_size=TILE, **{**_VISION, "num_hidden_layers": layers})
    common = dict(
        vision_config=vision,
        text_config=_text_config(tok),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
    )
    crop = {"height": TILE, "width": TILE}
    if family == "llava":
        model = tf.LlavaForConditionalGeneration(tf.LlavaConfig(**common))
        ip = tf.LlavaImageProcessor(size={"shortest_edge": TILE}, crop_size=crop, do_pad=True)
        proc_cls = tf.LlavaProcessor
    else:
        pins = [[h * TILE // 336, w * TILE // 336] for h, w in anyres.LLAVA_NEXT_PINPOINTS]
        model = tf.LlavaNextForConditionalGeneration(tf.LlavaNextConfig(**common, image_grid_pinpoints=pins))
        with torch.no_grad():
            model.model.image_newline.normal_()
        ip = tf.LlavaNextImageProcessor(size={"shortest_edge": TILE}, crop_size=crop, image_grid_pinpoints=pins)
        proc_cls = tf.LlavaNextProcessor
    proc = proc_cls(
        image_processor=ip,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
    )
    return model.eval(), proc, ["<image> what is in the image", "describe it <image>"]


def _logits(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw).logits


@pytest.mark.parametrize(
    "family, layer, strategy",
    [("llava", [-1, 1, -2], "full"), ("llava_next", [1, -1], "default")],
)
def test_tokens_and_logits_equal_transformers(family, layer, strategy):
    model, proc, texts = _llava(family, layer, strategy)
    images = _images([(300, 500), (400, 260)], seed=3)
    ref_in = proc(images=images, text=texts, return_tensors="pt", padding=True)
    ref = _logits(model, ref_in)
    encoder = encoder_from_model(model, proc)
    assert encoder.layer == tuple(layer) and encoder.token_width == 32 * len(layer)
    if family == "llava":  # the encoder's tokens: the tower's hidden states, cat on the channels
        with torch.no_grad():
            hs = model.model.vision_tower(ref_in["pixel_values"], output_hidden_states=True).hidden_states
            want = torch.cat([hs[k][:, 0 if strategy == "full" else 1 :] for k in layer], -1)
            got = encoder(images).tokens
        assert got.shape == want.shape == (2, (TILE // 14) ** 2 + (strategy == "full"), 32 * len(layer))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    model, aproc = attach(model, proc, encoder)
    inputs = aproc(images=images, text=texts, return_tensors="pt", padding=True)
    assert torch.equal(inputs["input_ids"], ref_in["input_ids"])  # the same image-token counts
    torch.testing.assert_close(_logits(model, inputs), ref, rtol=0, atol=1e-5)


def test_another_layer_list_at_forward_is_honoured_and_another_count_refused():
    model, proc, texts = _llava("llava", [-1, 1], "default")
    images = _images([(200, 260)])
    ref_in = proc(images=images, text=texts[:1], return_tensors="pt")
    ref = _logits(model, ref_in, vision_feature_layer=[2, -3])
    model, aproc = attach(model, proc, encoder_from_model(model, proc))
    inputs = aproc(images=images, text=texts[:1], return_tensors="pt")
    torch.testing.assert_close(_logits(model, inputs, vision_feature_layer=[2, -3]), ref, rtol=0, atol=1e-5)
    with raises_naming(ValueError, "vision_feature_layer=[-1, 1, 2]", "(-1, 1)", FIX):
        _logits(model, inputs, vision_feature_layer=[-1, 1, 2])
    with raises_naming(ValueError, "vision_feature_layer=[2, -2]", FIX):
        _logits(model, inputs, vision_feature_layer=[2, -2])
    with raises_naming(ValueError, "vision_feature_select_strategy='full'", "'default'", FIX):
        _logits(model, inputs, vision_feature_select_strategy="full")


def test_config_refusals_name_the_model_s_setting():
    model, proc, _ = _llava("llava_next", -2, "full", layers=2)
    with raises_naming(ValueError, "vision_feature_select_strategy='full'", "select_strategy='default'", FIX):
        encoder_from_model(model, proc)
    model.config.vision_feature_select_strategy = "default"
    model.config.vision_feature_layer = [-1, 2]  # block 2 twice
    with raises_naming(ValueError, "vision_feature_layer=[-1, 2]", "twice", FIX):
        encoder_from_model(model, proc)
    model.config.vision_feature_layer = [-1, -3]
    with raises_naming(ValueError, "vision_feature_layer=[-1, -3]", "-3", FIX):
        encoder_from_model(model, proc)


def test_the_config_s_layers_are_read_and_survive_save_and_load(tmp_path):
    model, proc, texts = _llava("llava", -1, "default", layers=2)  # not the recipe's default, -2
    encoder = encoder_from_model(model, proc)
    assert encoder.layer == -1 and encoder.recipe_options == {"pad": True, "layer": -1}
    model, proc, texts = _llava("llava", [-1, 1], "full", layers=2)
    model, aproc = attach(model, proc, encoder_from_model(model, proc))
    inputs = aproc(images=_images([(300, 200)]), text=texts[:1], return_tensors="pt")
    ref = _logits(model, inputs)
    model.save_pretrained(tmp_path)
    save_front_end(model, tmp_path)
    restored, rproc = load_front_end(tf.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval(), proc, tmp_path)
    assert restored.hrperc_front_end is not None
    encoder = restored.model._hrperc_encoder
    assert (encoder.layer, encoder.recipe_options["select_strategy"]) == ((-1, 1), "full")
    torch.testing.assert_close(
        _logits(restored, rproc(images=_images([(300, 200)]), text=texts[:1], return_tensors="pt")),
        ref,
        rtol=0,
        atol=1e-5,
    )


def test_onevision_layer_list_equals_get_image_features():
    tile = 56  # a SigLIP tower of 4 x 4 tokens per tile, three blocks
    pins = [list(p) for p in anyres.ONEVISION_PINPOINTS]
    pins = [[h * tile // 384, w * tile // 384] for h, w in pins]
    torch.manual_seed(0)
    vision = tf.SiglipVisionConfig(image_size=tile, **{**_VISION, "num_hidden_layers": 3})
    cfg = tf.LlavaOnevisionConfig(
        vision_config=vision,
        text_config=_text_config(_tokenizer()),
        image_grid_pinpoints=pins,
        vision_feature_layer=[-1, 1],
    )
    mm = tf.LlavaOnevisionForConditionalGeneration(cfg).eval().model
    proc = tf.LlavaOnevisionImageProcessor(
        image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"height": tile, "width": tile}, image_grid_pinpoints=pins
    )
    sizes = [(100, 150), (60, 300)]
    images = _images(sizes, seed=5)
    batch = proc(images, return_tensors="pt", input_data_format="channels_first")
    enc = encoder_from_model(mm)
    assert enc.layer == (-1, 1) and enc.token_width == 64
    with torch.no_grad():
        ref = mm.get_image_features(
            batch["pixel_values"],
            batch["image_sizes"],
            vision_feature_layer=[-1, 1],
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
        ).pooler_output
        out = enc(images, project=mm.multi_modal_projector, newline=mm.image_newline)
    for b in range(len(sizes)):
        n = out.num_tokens[b]
        assert n == ref[b].shape[0]
        torch.testing.assert_close(out.tokens[b, :n], ref[b], rtol=0, atol=1e-5)
