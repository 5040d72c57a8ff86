"""The FrontEnd contract, run by the one runner: plan -> views (any size the backbone takes) -> one backbone
call per view shape and chunk -> assemble (reading the front end's own parts, the pixels when asked) -> pad.

A native-resolution front end (one view of the image's own size rounded to whole patches, on a timm ViT
with ``dynamic_img_size=True``) is written here as a user would, in one small class, and proves it.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
from _messages import FIX, raises_naming
from _models import vit as tiny_vit

import hrperc
from hrperc import DualPerspectiveCrop, DualPerspectiveEnhancement, HighResEncoder, wrap_backbone
from hrperc.modules.frontend import FrontEnd, ViewPlan, make_layout
from hrperc.ops import anyres
from hrperc.ops import preprocess as pp
from hrperc.ops.canvas import CropGeometry
from hrperc.recipes._common import options_of


class Native(FrontEnd):
    """One view: the image resized to its own size rounded to whole patches (1..``max_patches`` a side)."""

    def __init__(self, patch_size, max_patches: int = 8) -> None:
        super().__init__(None, patch_size)  # no fixed tile: every image has its own view size
        self.max_patches = max_patches

    def plan(self, image_size):
        (ph, pw), (H, W) = self.patch_size, image_size
        rows, cols = (min(self.max_patches, max(1, round(s / p))) for s, p in ((H, ph), (W, pw)))
        h, w = rows * ph, cols * pw
        geo = CropGeometry(tuple(image_size), (1, 1), (h, w), (h, w), (0, 0, h, w))
        return ViewPlan(tuple(image_size), 1, geo, make_layout(("image", rows * cols, (rows, cols))))

    def views(self, pixels, plan):
        return pp.resize(pixels, plan.geometry.tile_size)[:, None]  # uint8 stays uint8 until its ViT chunk

    def assemble(self, feats, plan, *, project=None):
        return feats[:, 0] if project is None else project(feats[:, 0])


def _spy(enc):
    """Record the shape of every backbone call of ``enc``."""
    calls, features = [], enc.backbone.features

    def spy(x, layer=None):
        calls.append(tuple(x.shape))
        return features(x, layer=layer)

    enc.backbone.features = spy
    return calls


def _reference(bb, image, size, layer=-2):
    """The backbone's tokens of ``image`` resized to ``size`` alone (one image, one call)."""
    view = pp.to_unit(pp.resize(image[None], size))
    return bb.features(bb.normalize(view), layer=layer)[0]


SIZES = [(30, 40), (57, 22), (31, 40), (10, 10), (100, 9), (40, 30), (56, 56)]


# --- a native-resolution front end ---------------------------------------------------------------------------
@pytest.mark.parametrize("uint8", [False, True])
def test_native_front_end_ragged_batch_equals_each_image_alone(uint8):
    enc = HighResEncoder(tiny_vit(dynamic=True), Native((7, 7)), max_batch=4)
    g = torch.Generator().manual_seed(0)
    images = [
        torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) if uint8 else torch.rand(3, h, w, generator=g)
        for h, w in SIZES
    ]
    with torch.no_grad():
        out = enc(images)
        expected = [enc.num_tokens(s) for s in SIZES]
        assert out.num_tokens == expected == [math.prod(enc.plan(s).layout[0].shape) for s in SIZES]
        assert out.tokens.shape == (len(SIZES), max(expected), 32) and out.token_mask.sum(1).tolist() == expected
        for b, (size, img) in enumerate(zip(SIZES, images)):
            n = expected[b]
            alone = enc(img)
            assert alone.num_tokens == [n] and not out.tokens[b, n:].any()
            torch.testing.assert_close(out.tokens[b, :n], alone.tokens[0], rtol=0, atol=1e-6)
            ref = _reference(enc.backbone, img, enc.plan(size).geometry.tile_size, enc.layer)
            torch.testing.assert_close(out.tokens[b, :n], ref, rtol=0, atol=1e-6)
            assert out.valid_masks[b].shape == enc.plan(size).layout[0].shape and out.valid_masks[b].all()
    assert out.encoded == {"encoded": len(SIZES), "skipped": 0}


@pytest.mark.parametrize("max_batch", [1, 2, 64])
def test_one_backbone_call_per_view_shape_and_chunk(max_batch):
    enc = HighResEncoder(tiny_vit(dynamic=True), Native((7, 7)), max_batch=max_batch)
    calls = _spy(enc)
    # uint8 and float images of one view shape share the call (uint8 joined in [0, 1])
    images = [torch.rand(3, h, w) for h, w in SIZES] + [torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8)]
    shapes = {}
    for img in images:
        shapes.setdefault(enc.plan(tuple(img.shape[-2:])).geometry.tile_size, []).append(img)
    with torch.no_grad():
        out = enc(images)
    want = sum(math.ceil(len(v) / max_batch) for v in shapes.values())
    assert len(calls) == want and len(shapes) == 6  # (28, 42) three times
    assert {c[-2:] for c in calls} == set(shapes) and sum(c[0] for c in calls) == len(images)
    assert out.num_tokens == [enc.num_tokens(tuple(i.shape[-2:])) for i in images]


def test_views_of_two_sizes_in_one_front_end():
    class TwoScales(FrontEnd):  # parts: the tile, and the image at twice the tile; tokens concatenated
        def plan(self, image_size):
            (t, _), (ht, wt) = self.tile_size, self.tile_tokens
            geo = CropGeometry(tuple(image_size), (1, 1), self.tile_size, self.tile_size, (0, 0, t, t))
            layout = make_layout(("small", ht * wt, (ht, wt)), ("large", 4 * ht * wt, (2 * ht, 2 * wt)))
            return ViewPlan(tuple(image_size), 2, geo, layout)

        def views(self, pixels, plan):
            t = self.tile_size[0]
            return pp.resize(pixels, (t, t))[:, None], pp.resize(pixels, (2 * t, 2 * t))[:, None]

        def assemble(self, feats, plan, *, project=None):
            small, large = feats
            return torch.cat([small[:, 0], large[:, 0]], 1)

    bb = wrap_backbone(tiny_vit(dynamic=True))
    enc = HighResEncoder(bb, TwoScales(bb.image_size, bb.patch_size))
    calls = _spy(enc)
    images = [torch.rand(3, 50, 70), torch.rand(3, 90, 40), torch.rand(3, 50, 70)]
    with torch.no_grad():
        out = enc(images)
        assert sorted(calls) == [(3, 3, 28, 28), (3, 3, 56, 56)]  # one call per shape, all images in it
        for b, img in enumerate(images):
            ref = torch.cat([_reference(bb, img, (28, 28)), _reference(bb, img, (56, 56))])
            torch.testing.assert_close(out.tokens[b], ref, rtol=0, atol=1e-6)
    assert out.num_tokens == [16 + 64] * 3


def test_views_the_backbone_does_not_take_are_refused():
    fixed = tiny_vit()  # a timm ViT without dynamic_img_size: its native 28 x 28 only
    enc = HighResEncoder(fixed, Native((7, 7)))
    with raises_naming(ValueError, "Native", "(28, 42)", "(28, 28)", "dynamic_img_size=True") as info:
        enc(torch.rand(3, 30, 40))
    assert FIX.search(str(info.value))
    assert enc(torch.rand(3, 28, 28)).num_tokens == [16]  # its native size runs
    for bad in ((42, 42), (30, 30)):
        with raises_naming(ValueError, f"tile_size={bad}", "(28, 28)"):
            HighResEncoder(tiny_vit(), DualPerspectiveCrop(grid=(2, 2), tile_size=bad), dem=None, combine="concat")
    with raises_naming(ValueError, "tile_size=(30, 30)", "(28, 28)", "(7, 7)"):  # not whole patches
        crop = DualPerspectiveCrop(grid=(2, 2), tile_size=30)
        HighResEncoder(tiny_vit(dynamic=True), crop, dem=None, combine="concat")


@pytest.mark.parametrize("tile", [21, 42])
def test_dual_perspective_tiles_of_another_size_run_where_the_backbone_takes_them(tile):
    enc = HighResEncoder(
        tiny_vit(dynamic=True), DualPerspectiveCrop(grid=(2, 2), tile_size=tile), dem=None, combine="concat"
    )
    calls = _spy(enc)
    with torch.no_grad():
        out = enc([torch.rand(3, 60, 50), torch.rand(3, 33, 90)])
    per = (tile // 7) ** 2
    assert out.num_tokens == [enc.num_tokens((60, 50))] * 2 == [per * (1 + 2 * 4)] * 2
    assert {c[-2:] for c in calls} == {(tile, tile)} and enc.tile_tokens == (tile // 7, tile // 7)
    assert out.valid_masks[0].shape == (2 * tile // 7, 2 * tile // 7)


# --- front ends own their parts -----------------------------------------------------------------------------
class MeanColour(FrontEnd):
    """One tile view plus one token from the pixels: the image's mean colour through a Linear it owns."""

    needs_pixels = True

    def __init__(self, tile_size, patch_size, width: int) -> None:
        super().__init__(tile_size, patch_size)
        self.colour = torch.nn.Linear(3, width)
        self.seen: list[list[tuple]] = []

    def plan(self, image_size):
        (t, _), (ht, wt) = self.tile_size, self.tile_tokens
        geo = CropGeometry(tuple(image_size), (1, 1), self.tile_size, self.tile_size, (0, 0, t, t))
        return ViewPlan(tuple(image_size), 1, geo, make_layout(("image", ht * wt, (ht, wt)), ("colour", 1, None)))

    def views(self, pixels, plan):
        return pp.resize(pixels, self.tile_size)[:, None]

    def assemble(self, feats, plan, *, pixels, project=None):
        self.seen.append([tuple(p.shape) for p in pixels])
        colour = torch.stack([pp.to_unit(p).float().mean((1, 2)) for p in pixels])
        return torch.cat([feats[:, 0], self.colour(colour)[:, None].to(feats.dtype)], 1)


def test_assemble_reads_the_pixels_and_the_front_end_holds_everything_but_the_backbone():
    bb = wrap_backbone(tiny_vit())
    fe = MeanColour(bb.image_size, bb.patch_size, 32)
    enc = HighResEncoder(bb, fe)
    images = [torch.rand(3, 40, 50), torch.randint(0, 256, (3, 20, 90), dtype=torch.uint8), torch.rand(3, 40, 50)]
    with torch.no_grad():
        out = enc(images)
    assert fe.seen == [[(3, 40, 50), (3, 20, 90), (3, 40, 50)]]  # one plan group: its images, in batch order
    want = fe.colour(torch.stack([pp.to_unit(i).float().mean((1, 2)) for i in images]))
    torch.testing.assert_close(out.tokens[:, 16], want.detach(), rtol=0, atol=1e-6)
    assert set(enc.front_end.state_dict()) == {"colour.weight", "colour.bias"}
    own = {"front_end.colour.weight", "front_end.colour.bias"}
    assert set(enc.state_dict()) == {f"backbone.{k}" for k in bb.state_dict()} | own
    assert {n for n, p in enc.named_parameters() if p.requires_grad} == own  # the backbone is frozen


@pytest.mark.parametrize(
    "build",
    [
        lambda: hrperc.create_encoder("inf_llava", tiny_vit()),
        lambda: HighResEncoder(tiny_vit(), DualPerspectiveCrop(grid="auto", tile_size=28), combine="concat"),
        lambda: hrperc.create_encoder("llava_next", tiny_vit(img=56), dcm=True),
        lambda: hrperc.create_encoder("internvl", tiny_vit(img=56), dcm=True),
    ],
    ids=["inf_llava", "dual-concat", "llava_next+dcm", "internvl+dcm"],
)
def test_the_front_end_owns_its_dem_and_older_state_dicts_load(build):
    enc = build()
    dem = enc.dem
    assert dem is enc.front_end.dem is not None
    assert set(enc.front_end.state_dict()) == {f"dem.{k}" for k in dem.state_dict()}
    assert set(enc.state_dict()) == {f"backbone.{k}" for k in enc.backbone.state_dict()} | {
        f"front_end.dem.{k}" for k in dem.state_dict()
    }
    # A state dict saved when the DEM was the encoder's own submodule (keys dem.*) loads into front_end.dem.
    torch.manual_seed(9)
    old = {
        k.replace("front_end.dem.", "dem.", 1): torch.randn_like(v) if v.is_floating_point() else v
        for k, v in enc.state_dict().items()
    }
    assert any(k.startswith("dem.") for k in old) and not any(k.startswith("front_end") for k in old)
    fresh = build()
    fresh.load_state_dict(old, strict=True)
    for k in dem.state_dict():
        assert torch.equal(fresh.dem.state_dict()[k], old[f"dem.{k}"]), k
    parent = torch.nn.ModuleDict({"vision": build()})  # ... under a prefix too
    parent.load_state_dict({f"vision.{k}": v for k, v in old.items()}, strict=True)
    assert all(torch.equal(parent["vision"].dem.state_dict()[k], old[f"dem.{k}"]) for k in dem.state_dict())
    # ... and the current keys round-trip
    again = build()
    again.load_state_dict(fresh.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), fresh.state_dict().values()))


def test_assigning_encoder_dem_gives_the_front_end_a_checked_dem():
    enc = hrperc.create_encoder("inf_llava", tiny_vit())
    new = DualPerspectiveEnhancement(32, 4)
    enc.dem = new
    assert enc.dem is new and enc.front_end.dem is new and "dem" not in enc._modules
    assert set(enc.state_dict()) - {k for k in enc.state_dict() if k.startswith("backbone.")} == {
        f"front_end.dem.{k}" for k in new.state_dict()
    }
    with raises_naming(ValueError, "dim=16", "hidden_size=32"):
        enc.dem = DualPerspectiveEnhancement(16, 2)
    with raises_naming(ValueError, "combine='mean'", "dem=None"):
        enc.dem = None
    with raises_naming(TypeError, "dem=str", "'default'"):
        enc.dem = "/no/such/checkpoint"
    assert enc.dem is new  # every refusal left it as it was
    dcm = hrperc.create_encoder("llava_next", tiny_vit(img=56), dcm=True)
    with raises_naming(ValueError, "reduction='bilinear'", "reduction='none'"):
        dcm.dem = DualPerspectiveEnhancement(32, 4)
    with raises_naming(ValueError, "dcm=True", "dem=None"):
        dcm.dem = None
    with raises_naming(ValueError, "does not use one", "dcm=True"):
        hrperc.create_encoder("llava_next", tiny_vit(img=56)).dem = DualPerspectiveEnhancement(32, 4, reduction="none")


def test_dem_none_means_no_dem_everywhere():
    vit = tiny_vit()
    images = [torch.rand(3, 60, 50), torch.rand(3, 28, 90)]
    plain = HighResEncoder(
        vit, DualPerspectiveCrop(grid=(3, 3), tile_size=28, mode="bicubic", antialias=False), dem=None, combine="concat"
    )
    recipe = hrperc.create_encoder("inf_llava", vit, dem=None, combine="concat")
    assert plain.dem is None and recipe.dem is None
    with torch.no_grad():
        assert torch.equal(plain(images).tokens, recipe(images).tokens)
    for build in (
        lambda: hrperc.create_encoder("inf_llava", vit, dem=None),
        lambda: HighResEncoder(vit, DualPerspectiveCrop(tile_size=28), dem=None),
    ):
        with raises_naming(ValueError, "combine='mean'", "dem=None", "dem='default'"):
            build()
    for name in ("llava15", "llava_next", "s2"):  # dem=None is taken by every recipe (a rebuild passes encoder.dem)
        assert hrperc.create_encoder(name, tiny_vit(img=56), dem=None).dem is None
    with raises_naming(ValueError, "does not use one", "dem=None"):
        hrperc.create_encoder("llava15", tiny_vit(img=56), dem=DualPerspectiveEnhancement(32, 4, reduction="none"))
    with raises_naming(ValueError, "dcm=True", "dem=None"):
        hrperc.create_encoder("llava_next", tiny_vit(img=56), dcm=True, dem=None)


def test_a_front_end_whose_tokens_are_not_its_plan_is_refused():
    class Short(Native):
        def assemble(self, feats, plan, *, project=None):
            return feats[:, 0, 1:]  # one token short of the layout

    enc = HighResEncoder(tiny_vit(dynamic=True), Short((7, 7)))
    with raises_naming(RuntimeError, "Short.assemble", "(1, 15, 32)", "16 tokens", "(1, 16, D)"):
        enc(torch.rand(3, 28, 28))


# --- plans and options ------------------------------------------------------------------------------------------
RECIPES = ("llava15", "llava_next", "llava_onevision", "internvl", "s2", "infimm_hd", "inf_llava")


@pytest.fixture(scope="module")
def encoders():
    vit = tiny_vit(img=56)
    return {name: hrperc.create_encoder(name, vit) for name in RECIPES}


@pytest.mark.parametrize("name", RECIPES)
def test_every_plan_is_a_frozen_dataclass_with_named_fields(encoders, name):
    enc = encoders[name]
    if name != "inf_llava":  # INF-LLaVA's settings read None / False off another front end (InternVL has a thumbnail)
        assert (enc.combine, enc.thumbnail, enc.encodes_thumbnail, enc.encode_all) == (None, False, False, False)
    for size in [(70, 90), (30, 300), (500, 41)]:
        plan = enc.plan(size)
        assert isinstance(plan, ViewPlan) and dataclasses.is_dataclass(plan)
        names = {f.name for f in dataclasses.fields(plan)}
        assert {"image_size", "views", "geometry", "layout"} <= names and not names & {"key", "info"}
        with pytest.raises(dataclasses.FrozenInstanceError):
            plan.views = 0
        assert plan == enc.view_plan(size) and hash(plan) == hash(enc.plan(size))
        assert plan.num_tokens == enc.num_tokens(size) == plan.layout[-1].stop
        assert plan.views == enc.num_backbone_passes(size) and plan.image_size == size


@pytest.mark.parametrize("name, kw", [("llava_next", {}), ("llava_onevision", {"max_tiles": 9})])
def test_the_anyres_count_is_derived_once(encoders, name, kw):
    enc = encoders[name]
    fe = enc.front_end
    for size in [(1, 1000), (70, 90), (300, 200), (2000, 3000), (56, 56), (57, 113)]:
        plan = enc.plan(size)
        ops = anyres.num_tokens(size, fe.pinpoints, tile_size=fe.tile_size, patch_size=fe.patch_size, **kw)
        assert plan.num_tokens == plan.anyres.num_tokens == ops, size
        assert plan.anyres == anyres.anyres_plan(size, fe.pinpoints, tile_size=56, patch_size=7, **kw)


@pytest.mark.parametrize("name", RECIPES)
def test_a_recipe_s_options_are_its_front_end_s_signature(encoders, name):
    enc = encoders[name]
    cls = type(enc.crop)  # the DualPerspectiveCrop for inf_llava, the recipe's front end otherwise
    # colour and prefix_tokens come from the backbone (its mean, its class tokens), not from the caller
    fixed = ("name", "colour", "prefix_tokens")
    declared = options_of(cls, leave_out=fixed + (("max_tiles",) if name == "llava_next" else ()))
    params = inspect.signature(cls.__init__).parameters
    vit = enc.backbone.model
    with raises_naming(TypeError, name, "'bogus'", *(f"'{o}'" for o in declared)):
        hrperc.create_encoder(name, vit, bogus=1)
    for option in declared:  # each one is taken; its declared default changes nothing (OneVision's max_tiles: 9)
        default = params[option].default
        if option == "max_tiles" and name == "llava_onevision":
            default = 9
        if default is inspect.Parameter.empty:
            continue
        other = hrperc.create_encoder(name, vit, **{option: default})
        if name != "inf_llava":  # inf_llava's released crop values differ from the crop's own defaults
            assert other.num_tokens((70, 90)) == enc.num_tokens((70, 90)), option


def test_timings_name_the_runner_s_stages():
    for enc in (hrperc.create_encoder("inf_llava", tiny_vit()), HighResEncoder(tiny_vit(dynamic=True), Native((7, 7)))):
        with torch.no_grad():
            out = enc(torch.rand(3, 40, 50), timings=True)
        assert list(out.timings) == ["views", "backbone", "assemble", "combine"]
