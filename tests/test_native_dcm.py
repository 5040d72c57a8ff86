"""``dcm=True`` on the native-resolution recipes (qwen2_vl, qwen2_5_vl, qwen3_vl, pixtral): INF-LLaVA's strided
global views of the same resized image and a DEM on the native map, with the model's count and layout kept.

The wiring is checked with two stand-in DEMs that echo one side: echoing the local map must give the
recipe's own tokens bit for bit (the padding, tiling and cropping of the native map are exact), echoing the
recombined global map must give the tower's features of hand-made strided views (the views are the
image's strided sub-images, padded by repeating the edge, in the DEM's order). Then: gradients reach only
the DEM, ragged batches equal single images, and the refusals.
"""

from __future__ import annotations

import pytest
import torch
from _messages import raises_naming
from torch import nn

tf = pytest.importorskip("transformers")

from _pixtral_tiny import build_pixtral  # noqa: E402
from _qwen_tiny import build_qwen  # noqa: E402

import hrperc  # noqa: E402
from hrperc.modules.native_dcm import edge_padded  # noqa: E402
from hrperc.ops.crop import local_merge, stride_merge  # noqa: E402
from hrperc.ops.preprocess import resize  # noqa: E402

QWEN_BUDGET = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
# recipe -> (a tower builder, options): Qwen's three towers, Pixtral-12B (merge 1) and Mistral 3 (merge 2)
CASES = {
    "qwen2_vl": lambda: (build_qwen("qwen2_vl")[0].model.visual, "qwen2_vl", QWEN_BUDGET),
    "qwen2_5_vl": lambda: (build_qwen("qwen2_5_vl")[0].model.visual, "qwen2_5_vl", QWEN_BUDGET),
    "qwen3_vl": lambda: (build_qwen("qwen3_vl")[0].model.visual, "qwen3_vl", dict(min_pixels=64 * 64)),
    "pixtral": lambda: (build_pixtral("llava")[0].model.vision_tower, "pixtral", {}),
    "mistral3": lambda: (build_pixtral("mistral3")[0].model.vision_tower, "pixtral", dict(merge_size=2)),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only wait on each other
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(CASES))
def towers(request):
    tower, recipe, options = CASES[request.param]()
    return tower.eval(), recipe, options


def _images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]


class EchoDEM(nn.Module):
    """A stand-in DEM returning one side's whole map, recombined (``side``: "local" or "global")."""

    reduction = "none"

    def __init__(self, dim: int, side: str) -> None:
        super().__init__()
        self.dim, self.side = dim, side
        self.scale = nn.Parameter(torch.ones(()))

    def num_tokens(self, grid, tile_size) -> int:
        return grid[0] * tile_size[0] * grid[1] * tile_size[1]

    def forward(self, local_feats, global_feats, grid, tile_size=None):
        merge = local_merge if self.side == "local" else stride_merge
        feats = local_feats if self.side == "local" else global_feats
        return self.scale * merge(feats, grid, layout="nlc", tile_size=tile_size)


SIZES = [(150, 230), (40, 300), (97, 61), (20, 25)]


def test_count_layout_and_passes_unchanged(towers):
    tower, recipe, options = towers
    plain = hrperc.create_encoder(recipe, tower, **options)
    for grid in ((2, 2), (3, 2)):
        upgraded = hrperc.create_encoder(recipe, tower, dcm=True, dcm_grid=grid, **options)
        for size in [(1, 1), (28, 29), (57, 900), (900, 57), (333, 444), (1000, 1000), *SIZES]:
            a, b = plain.plan(size), upgraded.plan(size)
            assert (b.num_tokens, b.layout, b.resized) == (a.num_tokens, a.layout, a.resized)
            assert upgraded.num_backbone_passes(size) == 1 + grid[0] * grid[1]


def test_local_echo_gives_the_recipes_tokens(towers):
    tower, recipe, options = towers
    plain = hrperc.create_encoder(recipe, tower, **options)
    width = plain.backbone.hidden_size
    echo = hrperc.create_encoder(recipe, tower, dcm=True, dem=EchoDEM(width, "local"), **options)
    images = _images(SIZES)
    want, got = plain(images), echo(images)
    assert got.num_tokens == want.num_tokens
    assert torch.equal(got.tokens, want.tokens)
    assert got.encoded["encoded"] == 5 * len(SIZES)
    for name, level in want.extras.items():  # Qwen3-VL's deepstack levels: the native view's, unchanged
        assert torch.equal(got.extras[name], level)


def test_global_echo_reads_the_strided_views(towers):
    """The global map the DEM receives is the tower's features of the image's strided sub-images."""
    tower, recipe, options = towers
    plain = hrperc.create_encoder(recipe, tower, **options)
    width, grid = plain.backbone.hidden_size, (2, 3)
    echo = hrperc.create_encoder(recipe, tower, dcm=True, dcm_grid=grid, dem=EchoDEM(width, "global"), **options)
    fe = plain.front_end
    unit = fe.patch * (fe.merge if recipe != "pixtral" else fe.merge_size)
    for image in _images([(300, 400), (61, 500)], seed=1):
        plan = echo.plan(tuple(image.shape[-2:]))
        resized = resize(image, plan.resized)
        rv, cv = plan.global_cells
        padded = edge_padded(resized, (grid[0] * rv * unit, grid[1] * cv * unit))
        views = [padded[:, i :: grid[0], j :: grid[1]] for i in range(grid[0]) for j in range(grid[1])]
        # each view is a whole number of cells inside the budget: the plain recipe encodes it as it is
        assert all(plain.plan(tuple(v.shape[-2:])).resized == tuple(v.shape[-2:]) for v in views)
        maps = plain(views, project=None)
        ref = _native_maps(plain, maps, [tuple(v.shape[-2:]) for v in views], recipe, fe)
        rows, cols = plan.layout[0].shape
        m = 1 if recipe != "pixtral" else fe.merge_size
        whole = stride_merge(ref, grid, layout="nhwc")[:, : rows * m, : cols * m]
        got = _native_maps(echo, echo([image]), [tuple(image.shape[-2:])], recipe, fe)
        torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-5)


def _native_maps(enc, out, sizes, recipe, fe):
    """The ``(b, H, W, D)`` native maps under an encoder's tokens (Pixtral: the patch map, slots and merge undone)."""
    maps = []
    for b, size in enumerate(sizes):
        rows, cols = enc.plan(size).layout[0].shape
        t = out.tokens[b, : out.num_tokens[b]]
        if recipe != "pixtral":
            maps.append(t.view(rows, cols, -1))
            continue
        m = fe.merge_size
        cells = t.view(rows, cols + 1, -1)[:, :cols]  # the [IMG_BREAK] / [IMG_END] slots dropped
        d = cells.shape[-1] // (m * m)
        maps.append(cells.view(rows, cols, m, m, d).permute(0, 2, 1, 3, 4).reshape(rows * m, cols * m, d))
    return torch.stack(maps) if len({tuple(x.shape) for x in maps}) == 1 else maps


@pytest.mark.parametrize("recipe", ["qwen2_5_vl", "mistral3"])
def test_gradients_reach_only_the_dem_and_ragged_equals_single(recipe):
    tower, name, options = CASES[recipe]()
    enc = hrperc.create_encoder(name, tower, dcm=True, **options).train()
    images = _images(SIZES[:3], seed=2)
    out = enc(images)
    (out.tokens * torch.randn_like(out.tokens)).sum().backward()
    assert all(p.grad is None for p in tower.parameters())
    dem = list(enc.dem.parameters())
    assert dem and all(p.grad is not None and p.grad.abs().sum() > 0 for p in dem)
    with torch.no_grad():  # the batch's tokens (the pass above) equal each image's alone
        for b, image in enumerate(images):
            alone = enc([image])
            n = alone.num_tokens[0]
            torch.testing.assert_close(out.tokens[b, :n].detach(), alone.tokens[0, :n], rtol=1e-5, atol=1e-5)


def test_refusals():
    tower, recipe, options = CASES["qwen2_vl"]()
    with raises_naming(ValueError, "dcm_grid", "(1, 1)"):
        hrperc.create_encoder(recipe, tower, dcm=True, dcm_grid=1, **options)
    with raises_naming(ValueError, "grid"):
        hrperc.create_encoder(recipe, tower, dcm=True, dcm_grid=(0, 2), **options)
    with raises_naming(TypeError, "dcm"):
        hrperc.create_encoder(recipe, tower, dcm="yes", **options)
    width = 32
    with raises_naming(ValueError, "dem", "dcm=True"):
        hrperc.create_encoder(recipe, tower, dem=EchoDEM(width, "local"), **options)
    with raises_naming(ValueError, "dem=None"):
        hrperc.create_encoder(recipe, tower, dcm=True, dem=None, **options)
    with raises_naming(ValueError, "reduction"):
        dem = hrperc.DualPerspectiveEnhancement(width, heads=2, reduction="bilinear")
        hrperc.create_encoder(recipe, tower, dcm=True, dem=dem, **options)
    with raises_naming(ValueError, "dim=16"):
        hrperc.create_encoder(recipe, tower, dcm=True, dem=EchoDEM(16, "local"), **options)
