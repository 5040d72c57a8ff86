"""The recipes' public surface: options and refusals, the DCM+DEM upgrade, slots, dtypes, one runner."""

from __future__ import annotations

import pytest
import torch
from _messages import FIX, raises_naming
from _models import random_images
from _models import vit as tiny_vit

import hrperc
from hrperc import HighResEncoder

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
