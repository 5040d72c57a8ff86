"""The recipes' public surface: options (declared, with their defaults) and refusals, the DCM+DEM upgrade,
slots, dtypes, one runner."""

from __future__ import annotations

import re

import pytest
import torch
from _messages import FIX, raises_naming
from _models import random_images
from _models import vit as tiny_vit

import hrperc
from hrperc import HighResEncoder, recipes
from hrperc.recipes import recipe_options, recipe_spec, register_recipe
from hrperc.recipes._common import EMPTY
from hrperc.recipes.llava_next import AnyresFrontEnd

RECIPES = ("llava15", "llava_next", "llava_onevision", "internvl", "s2", "infimm_hd")
# on their models' own towers: tests/test_qwen_recipes.py, tests/test_pixtral_recipe.py
NATIVE = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "pixtral")
# on their models' own towers too: tests/test_idefics3_recipe.py, tests/test_gemma3_recipe.py,
# tests/test_minicpm_v_recipe.py
TOWER_TILED = ("idefics3", "smolvlm", "gemma3", "minicpm_v")


def test_every_recipe_is_listed_and_built_as_a_high_res_encoder():
    assert set(RECIPES) | set(NATIVE) | set(TOWER_TILED) | {"inf_llava"} == set(hrperc.list_recipes())
    for name in RECIPES:
        enc = hrperc.create_encoder(name, tiny_vit(56))
        assert isinstance(enc, HighResEncoder)
        assert enc.frontend is not None and enc.dem is None  # no DEM unless dcm=True
        out = enc(random_images([(70, 90)]))
        assert out.num_tokens == [enc.num_tokens((70, 90))]
        assert out.plans[0] == enc.view_plan((70, 90))
        assert not any(p.requires_grad for p in enc.backbone.parameters())  # frozen, as every recipe's default


def test_recipe_defaults_read_the_layer_of_the_published_system():
    layers = {name: hrperc.create_encoder(name, tiny_vit(56)).layer for name in RECIPES}
    assert layers == {"llava15": -2, "llava_next": -2, "llava_onevision": -1, "internvl": -1, "s2": -2, "infimm_hd": -1}
    assert hrperc.create_encoder("llava_next", tiny_vit(56), layer=-1).layer == -1  # an option overrides it


@pytest.mark.parametrize("name", RECIPES)
def test_unknown_options_are_refused_with_the_recipe_s_list(name):
    with raises_naming(TypeError, name, "'grid_pinpoint'", "layer") as info:
        hrperc.create_encoder(name, tiny_vit(56), grid_pinpoint=[[56, 112]])
    assert FIX.search(str(info.value))


def test_front_end_options_are_checked_at_construction():
    with raises_naming(ValueError, "(60, 112)", "56"):
        hrperc.create_encoder("llava_next", tiny_vit(56), pinpoints=[(60, 112)])
    with raises_naming(ValueError, "tie_break='width'"):
        hrperc.create_encoder("llava_next", tiny_vit(56), tie_break="width")
    with raises_naming(ValueError, "scales=(1, 1.5)"):
        hrperc.create_encoder("s2", tiny_vit(56), scales=(1, 1.5))
    with raises_naming(ValueError, "downsample=3", "(8, 8)"):
        hrperc.create_encoder("internvl", tiny_vit(56), downsample=3)
    with raises_naming(ValueError, "max_side=0"):
        hrperc.create_encoder("infimm_hd", tiny_vit(56), max_side=0)
    with raises_naming(TypeError, "pad='yes'"):
        hrperc.create_encoder("llava15", tiny_vit(56), pad="yes")


def test_the_runner_refuses_what_does_not_apply_to_a_front_end():
    fe = hrperc.create_encoder("llava_next", tiny_vit(56)).frontend
    with raises_naming(ValueError, "combine='mean'"):
        HighResEncoder(tiny_vit(56), fe, combine="mean")
    with raises_naming(ValueError, "dcm=True", "dem=None"):
        HighResEncoder(tiny_vit(56), fe, dem=hrperc.DualPerspectiveEnhancement(32, 2, reduction="none"))
    with raises_naming(ValueError, "patch_size=(7, 7)", "(8, 8)"):
        HighResEncoder(tiny_vit(img=56, patch=8), fe, dem=None)
    dcm = hrperc.create_encoder("llava_next", tiny_vit(56), dcm=True).frontend
    with raises_naming(ValueError, "dcm=True", "dem=None"):
        HighResEncoder(tiny_vit(56), dcm, dem=None)
    with raises_naming(ValueError, "subimage_features", "AnyresFrontEnd", "forward"):
        hrperc.create_encoder("llava_next", tiny_vit(56)).subimage_features(random_images([(60, 60)]))
    plain = hrperc.create_encoder("inf_llava", tiny_vit(56))  # one kind of plan for every front end
    assert plain.view_plan((60, 60)) == plain.plan((60, 60)) and plain.plan((60, 60)).grid == (3, 3)


def test_project_applies_per_token_on_the_dual_perspective_path_too():
    crop = hrperc.DualPerspectiveCrop(grid="auto", max_tiles=4, tile_size=56)
    enc = HighResEncoder(tiny_vit(56), crop, dem=None, combine="concat")  # tokens per image follow the grid
    proj = torch.nn.Linear(32, 5)
    images = random_images([(56, 56), (60, 200)])  # grids (1, 1) and (1, 4)
    with torch.no_grad():
        out, projected = enc(images), enc(images, project=proj)
    assert projected.tokens.shape[-1] == 5
    keep = out.token_mask
    torch.testing.assert_close(projected.tokens[keep], proj(out.tokens[keep]), atol=1e-6, rtol=0)
    assert (~keep).any() and projected.tokens[~keep].abs().sum() == 0  # the ragged padding stays zero


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision", "internvl"])
def test_dcm_dem_upgrade_keeps_the_count_and_trains_only_the_dem(name):
    plain = hrperc.create_encoder(name, tiny_vit(56))
    enc = hrperc.create_encoder(name, tiny_vit(56), dcm=True)
    assert enc.dem is not None and enc.dem.reduction == "none"
    sizes = [(70, 90), (30, 200), (160, 120)]
    for size in sizes:
        assert enc.num_tokens(size) == plain.num_tokens(size)
        grid = plain.view_plan(size).grid
        assert enc.num_backbone_passes(size) == plain.num_backbone_passes(size) + grid[0] * grid[1]  # + strided
    out = enc(random_images(sizes))
    assert out.num_tokens == [plain.num_tokens(s) for s in sizes]
    real = out.tokens[out.token_mask & ~out.slot_mask]
    real.square().mean().backward()
    grads = [p.grad for p in enc.dem.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in enc.backbone.parameters())
    # the DEM changes the tokens of the high-resolution map, not the layout around it
    ref = plain(random_images(sizes))
    assert torch.equal(out.slot_mask, ref.slot_mask) and torch.equal(out.token_mask, ref.token_mask)
    assert not torch.allclose(out.tokens.detach(), ref.tokens)


def test_slots_are_zero_marked_and_filled_by_newline():
    enc = hrperc.create_encoder("llava_next", tiny_vit(56))
    images = random_images([(70, 90), (200, 30)])
    out = enc(images)
    for b, segs in enumerate(out.layout):
        tiles = segs[-1]
        assert tiles.newline and tiles.length == tiles.shape[0] * (tiles.shape[1] + 1)
        assert int(out.slot_mask[b].sum()) == tiles.shape[0]  # one slot per row
    assert out.tokens[out.slot_mask].abs().max() == 0
    v = torch.randn(32)
    filled = enc(images, newline=v)
    assert torch.equal(filled.tokens[filled.slot_mask], v.expand(int(out.slot_mask.sum()), 32))
    assert torch.equal(filled.tokens[~filled.slot_mask], out.tokens[~out.slot_mask])
    flat = hrperc.create_encoder("llava_next", tiny_vit(56), newline=False)
    assert flat.num_tokens((70, 90)) == enc.num_tokens((70, 90)) - int(out.slot_mask[0].sum())


def test_project_runs_where_the_model_projects_and_changes_the_width():
    proj = torch.nn.Linear(32, 12)
    for name in ("llava_next", "llava_onevision", "s2", "internvl"):
        enc = hrperc.create_encoder(name, tiny_vit(56))
        images = random_images([(70, 90)])
        with torch.no_grad():
            out, projected = enc(images), enc(images, project=proj if name not in ("s2", "internvl") else None)
        if name in ("llava_next",):  # per-token projection commutes with unpadding: project after = before
            keep = ~out.slot_mask
            torch.testing.assert_close(projected.tokens[keep], proj(out.tokens[keep]), atol=1e-6, rtol=0)
        if name == "llava_onevision":
            assert projected.tokens.shape[-1] == 12
    # OneVision shrinks after the projector: a nonlinear projector does not commute with the shrink
    enc = hrperc.create_encoder("llava_onevision", tiny_vit(56))
    big = random_images([(700, 700)])
    assert enc.plan((700, 700)).anyres.shape != enc.plan((700, 700)).anyres.unpadded  # the shrink happens
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.GELU(), torch.nn.Linear(16, 16))
    with torch.no_grad():
        inside, plain = enc(big, project=mlp).tokens, enc(big).tokens
    assert not torch.allclose(inside, mlp(plain), atol=1e-4)


@pytest.mark.parametrize("name", RECIPES)
def test_a_bf16_encoder_runs_in_bf16_close_to_fp32(name):
    enc = hrperc.create_encoder(name, tiny_vit(56))
    images = random_images([(70, 90), (40, 100)])
    with torch.no_grad():
        ref = enc(images).tokens
        out = enc.to(torch.bfloat16)(images).tokens
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert (out.float() - ref).abs().max() <= 0.05 * max(1.0, ref.abs().max().item())


def test_float_and_uint8_images_are_prepared_by_their_own_steps():
    enc = hrperc.create_encoder("llava15", tiny_vit(56))
    u8 = random_images([(70, 90)])[0]
    f = u8.float() / 255
    with torch.no_grad():
        a, b, both = enc(u8).tokens, enc(f).tokens, enc([u8, f]).tokens
    torch.testing.assert_close(both[0], a[0], atol=1e-6, rtol=0)  # a mixed list keeps each image's path
    torch.testing.assert_close(both[1], b[0], atol=1e-6, rtol=0)
    assert not torch.equal(a, b)  # uint8 is resized in uint8 (rounded), as the processors do


def test_batch_tensor_and_list_agree():
    enc = hrperc.create_encoder("internvl", tiny_vit(56))
    x = torch.randint(0, 256, (2, 3, 80, 150), dtype=torch.uint8)
    with torch.no_grad():
        a, b = enc(x).tokens, enc(list(x)).tokens
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ---- the declared options: hrperc.recipes.recipe_options / register_recipe ------------------------------------

# The released values each recipe declares, written out here (not read from the specs): what a built encoder uses.
RELEASED = {
    "llava15": {"layer": -2},
    "llava_next": {"layer": -2},
    "llava_onevision": {"layer": -1, "max_tiles": 9},
    "internvl": {"layer": -1, "max_tiles": 12},
    "s2": {"layer": -2, "scales": (1, 2)},
    "infimm_hd": {"layer": -1},
    "inf_llava": {"layer": -2, "grid": (3, 3), "antialias": False, "combine": "mean"},
    "qwen2_vl": {"layer": -1, "min_pixels": 3136, "max_pixels": 12845056},
    "qwen2_5_vl": {"layer": -1, "min_pixels": 3136, "max_pixels": 12845056},
    "qwen3_vl": {"layer": -1, "min_pixels": 65536, "max_pixels": 16777216},
    "pixtral": {"layer": -1, "merge_size": 1},
    "idefics3": {"layer": -1, "scale_factor": 2},
    "smolvlm": {"layer": -1, "scale_factor": 4},
    "gemma3": {"layer": -1, "mm_tokens_per_image": 256},
    "minicpm_v": {"layer": -1, "max_slice_nums": 9},
}


def _tower(name: str):
    """A tiny random tower ``name`` builds on: a timm ViT for the tiling recipes (16 x 16 patches for Gemma 3's
    256 pooled tokens), the model's own vision tower, from its vision config alone, for the others."""
    if name not in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "pixtral", "minicpm_v"):
        return tiny_vit(112) if name == "gemma3" else tiny_vit(56)
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    small = dict(hidden_size=32, num_heads=2)
    if name == "qwen2_vl":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

        return Qwen2VisionTransformerPretrainedModel(tf.Qwen2VLVisionConfig(depth=1, embed_dim=32, **small))
    if name == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        config = tf.Qwen2_5_VLVisionConfig(depth=1, intermediate_size=64, out_hidden_size=32, **small)
        return Qwen2_5_VisionTransformerPretrainedModel(config)
    if name == "qwen3_vl":
        config = tf.Qwen3VLVisionConfig(
            depth=1, intermediate_size=64, out_hidden_size=32, num_position_embeddings=64, **small
        )
        config.deepstack_visual_indexes = [0]
        return tf.Qwen3VLVisionModel(config)
    if name == "pixtral":
        config = tf.PixtralVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=16
        )
        return tf.PixtralVisionModel(config)
    from transformers.models.minicpmv4_6.configuration_minicpmv4_6 import MiniCPMV4_6VisionConfig
    from transformers.models.minicpmv4_6.modeling_minicpmv4_6 import MiniCPMV4_6VisionModel

    config = MiniCPMV4_6VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=70,
        insert_layer_id=0,
    )
    return MiniCPMV4_6VisionModel(config)


@pytest.mark.parametrize("name", hrperc.list_recipes())
def test_recipe_options_are_what_the_builder_accepts_with_the_defaults_it_uses(name):
    options = recipe_options(name)
    assert set(RELEASED[name].items()) <= {(k, o.default) for k, o in options.items()}
    # an unknown name is refused, listing exactly the declared names
    with pytest.raises(TypeError) as info:
        hrperc.create_encoder(name, None, no_such_option=1)
    listed = set(re.findall(r"'(\w+)'", str(info.value).split("unknown option(s)", 1)[1])) - {"no_such_option"}
    assert listed == set(options)
    tower = _tower(name)
    enc = hrperc.create_encoder(name, tower.eval())
    # each declared default is what the built encoder holds (the front end's or the runner's attribute)
    checked = set()
    for key, option in options.items():
        holder = enc.crop if option.owner == "front end" else enc
        if option.default in (EMPTY, None) or key == "dem" or not hasattr(holder, key):
            continue
        assert getattr(holder, key) == option.default, key
        checked.add(key)
    assert set(RELEASED[name]) <= checked
    # every declared name is accepted: all of them at their declared defaults build the same encoder
    given = {k: o.default for k, o in options.items() if o.default is not EMPTY and k != "dem"}
    same = hrperc.create_encoder(name, enc.backbone, **given)
    assert repr(same.crop) == repr(enc.crop) and same.layer == enc.layer
    for size in [(70, 90), (300, 200), (1000, 1400)]:
        assert same.num_tokens(size) == enc.num_tokens(size), size


def test_a_default_the_recipe_computes_is_described_by_its_note():
    pixtral = recipe_options("pixtral")["longest_edge"]
    assert pixtral.default is None and "merge_size" in pixtral.note
    tower = _tower("pixtral")
    edges = [hrperc.create_encoder("pixtral", tower, merge_size=m).front_end.longest_edge for m in (1, 2)]
    assert edges == [1024, 1540] and all(str(e) in pixtral.note for e in edges)
    pinpoints = recipe_options("llava_next")["pinpoints"]
    assert pinpoints.default is EMPTY and "336" in pinpoints.note
    enc = hrperc.create_encoder("llava_next", tiny_vit(56))  # 336 px canvases scaled to the 56 px tile
    assert enc.front_end.pinpoints == ((56, 112), (112, 56), (112, 112), (168, 56), (56, 168))


def test_register_recipe_refuses_a_spec_that_names_what_the_front_end_lacks():
    with raises_naming(TypeError, "front_end=", "class"):
        register_recipe("spec_probe", front_end=object())
    with raises_naming(ValueError, "leave_out", "'colour'", "AnyresFrontEnd"):
        register_recipe("spec_probe", front_end=AnyresFrontEnd, leave_out=("colour",))
    with raises_naming(ValueError, "defaults", "'tiles'", "max_tiles"):
        register_recipe("spec_probe", front_end=AnyresFrontEnd, defaults={"tiles": 3})
    with raises_naming(ValueError, "encoder_options", "'nope'", "combine"):
        register_recipe("spec_probe", front_end=AnyresFrontEnd, encoder_options=("layer", "nope"))
    with raises_naming(ValueError, "defaults", "front_end="):
        register_recipe("spec_probe", defaults={"layer": -2})
    assert "spec_probe" not in hrperc.list_recipes()


def test_a_recipe_registered_without_a_front_end_declares_no_options():
    @register_recipe("spec_probe")
    def build(backbone, **options):
        return HighResEncoder(backbone, **options)

    try:
        assert recipe_spec("spec_probe").builder is build and not recipe_spec("spec_probe").declared
        assert recipe_options("spec_probe") == {}
    finally:
        recipes._RECIPES.pop("spec_probe", None)
    with raises_naming(ValueError, "recipe='nope'", "llava_next"):
        recipe_options("nope")
