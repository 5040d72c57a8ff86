"""DualPerspectiveEnhancement: released parity, skipping unread work, options, dtypes, loading."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from _dem_literal import released_dem
from _messages import raises_naming
from _tolerance import assert_close_to_reference

import hrperc
from hrperc import DualPerspectiveEnhancement as DEM
from hrperc.attention import AttentionBackend, get_backend, register_backend, unregister_backend
from hrperc.attention.dispatch import ENV_VAR
from hrperc.attention.reference import sdpa_query_subset, sdpa_window_attention
from hrperc.modules.fusion import FUSIONS
from hrperc.ops.reduce import REDUCTIONS
from hrperc.pretrained.inf_llava import load_dem, released_state_dict


def _randomise(module, std=0.3):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


def _feats(b, grid, t, d, dtype=torch.float32):
    n = grid[0] * grid[1]
    return torch.randn(b * n, t, d, dtype=dtype), torch.randn(b * n, t, d, dtype=dtype)


def _released_weights(d, gen):
    """Random weights in the released key layout (relative to spatial_embed.)."""
    sd = {}
    for i in range(4):
        sd[f"attention.linears.{i}.weight"] = torch.randn(d, d, generator=gen) / d**0.5
        sd[f"attention.linears.{i}.bias"] = torch.randn(d, generator=gen) * 0.1
    for name in ("attention.ln", "ln_fuse"):
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(d, generator=gen)
        sd[f"{name}.bias"] = 0.1 * torch.randn(d, generator=gen)
    for name in ("ffn_crop", "ffn_stride"):
        sd[f"{name}.0.weight"] = torch.randn(d // 16, d, generator=gen) / d**0.5
        sd[f"{name}.0.bias"] = torch.randn(d // 16, generator=gen) * 0.1
        sd[f"{name}.2.weight"] = torch.randn(d // 2, d // 16, generator=gen) / (d // 16) ** 0.5
        sd[f"{name}.2.bias"] = torch.randn(d // 2, generator=gen) * 0.1
    return sd


# ---- released parity ------------------------------------------------------------------------------


@pytest.mark.parametrize("skip_unread", [True, False])
def test_released_parity_with_literal_implementation(skip_unread):
    """Converted random weights, D=64, 2 heads, grid 3x3: equal to the literal per-window released math."""
    gen = torch.Generator().manual_seed(1)
    sd = _released_weights(64, gen)
    full_ckpt = {"model.spatial_embed." + k: v for k, v in sd.items()}
    full_ckpt["model.mm_projector.0.weight"] = torch.randn(8, 64)  # other modules' keys are ignored
    full_ckpt["model.layers.0.mlp.weight"] = torch.randn(3, 3)
    dem = load_dem(full_ckpt, heads=2, skip_unread=skip_unread)
    loc, glo = _feats(2, (3, 3), 36, 64)
    out = dem(loc, glo, (3, 3))
    ref = released_dem(loc, glo, (3, 3), sd, heads=2)
    assert out.shape == (2, 36, 64)
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "grid,tile,pairing",
    [((2, 2), 4, "released"), ((4, 4), 3, "released"), ((3, 2), 5, "paper"), ((1, 1), 4, "released")],
)
def test_parity_other_grids_and_paper_pairing(grid, tile, pairing):
    dem = _randomise(DEM(32, 4, pairing=pairing))
    loc, glo = _feats(2, grid, tile * tile, 32)
    ref = released_dem(loc, glo, grid, released_state_dict(dem), heads=4, pairing=pairing)
    assert (dem(loc, glo, grid) - ref).abs().max().item() <= 1e-5


def test_load_dem_accepts_bare_keys_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    sd = _released_weights(32, torch.Generator().manual_seed(2))
    a = load_dem(sd, heads=4)
    save_file({"spatial_embed." + k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "dem.safetensors"))
    b = load_dem(tmp_path / "dem.safetensors", heads=4)
    torch.save({"spatial_embed." + k: v for k, v in sd.items()}, tmp_path / "dem.bin")
    c = load_dem(str(tmp_path / "dem.bin"), heads=4)
    for m in (b, c):
        for (k1, v1), (k2, v2) in zip(a.state_dict().items(), m.state_dict().items()):
            assert k1 == k2 and torch.equal(v1, v2)


def test_load_dem_refuses_pickles_and_bad_dicts(tmp_path):
    sd = _released_weights(32, torch.Generator().manual_seed(3))
    torch.save(
        {"spatial_embed.attention.linears.0.weight": sd["attention.linears.0.weight"], "x": _Opaque()},
        tmp_path / "evil.pt",
    )
    with raises_naming(ValueError, "evil.pt", "is a pickle", "safetensors"):
        load_dem(str(tmp_path / "evil.pt"), heads=4)
    missing = {k: v for k, v in sd.items() if k != "ln_fuse.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['ln_fuse.bias'\]"):
        load_dem(missing, heads=4)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
        load_dem({**sd, "extra.weight": torch.zeros(1)}, heads=4)
    bad = dict(sd)
    bad["ffn_crop.2.weight"] = torch.zeros(16, 3)
    with raises_naming(ValueError, "ffn_crop.2.weight", "checkpoint (16, 3)", "module (16, 2)"):
        load_dem(bad, heads=4)
    with pytest.raises(ValueError, match="attention.linears.0.weight"):
        load_dem({"foo": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"fusion='add'.*fusion='released'"):
        load_dem(sd, heads=4, fusion="add")
    with pytest.raises(ValueError, match=r"residual_norm=False.*residual_norm=True"):
        load_dem(sd, heads=4, residual_norm=False)


class _Opaque:
    pass


# ---- skipping unread work -------------------------------------------------------------------------

CONFIGS = [
    dict(),
    dict(pairing="paper"),
    dict(shared_attention=False),
    dict(residual_norm=False, fusion="linear_concat"),
    dict(directions="global"),
    dict(directions="local", pairing="paper"),
    dict(directions="none", fusion="add"),
    dict(fusion="weighted_add", reduction="avg"),
    dict(fusion="multiply", reduction="area", output_size=(3, 2)),
    dict(fusion="maxpool", output_size=(2, 5)),
    dict(fusion="conv3x3"),
    dict(reduction="none"),
    # pooled before the affine maps (no LayerNorm after attention, affine fusion, average pooling)
    dict(residual_norm=False, fusion="linear_concat", reduction="avg"),
    dict(residual_norm=False, fusion="add", reduction="area", output_size=(3, 2), pairing="paper"),
    dict(residual_norm=False, fusion="weighted_add", reduction="area", directions="local", shared_attention=False),
    dict(directions="none", fusion="add", reduction="avg"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "released")
@pytest.mark.parametrize("grid", [(3, 3), (2, 4)])
def test_skip_equals_full_and_unrequired_subimages_are_never_read(cfg, grid):
    dem = _randomise(DEM(32, 2, **cfg))
    loc, glo = _feats(2, grid, 16, 32)
    fast = dem(loc, glo, grid)
    dem.skip_unread = False
    full = dem(loc, glo, grid)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    dem.skip_unread = True
    need_loc, need_glo = dem.required_subimages(grid, (4, 4))
    n = grid[0] * grid[1]
    junk_loc, junk_glo = loc.clone().view(2, n, 16, 32), glo.clone().view(2, n, 16, 32)
    junk_loc[:, ~need_loc] = 1e3 * torch.randn_like(junk_loc[:, ~need_loc])
    junk_glo[:, ~need_glo] = 0.0
    assert torch.equal(dem(junk_loc.view_as(loc), junk_glo.view_as(glo), grid), fast)
    dem.skip_unread = False
    torch.testing.assert_close(dem(junk_loc.view_as(loc), junk_glo.view_as(glo), grid), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "grid,expect_glo",
    [((3, 3), [4]), ((5, 5), [12]), ((4, 4), [5, 6, 9, 10]), ((2, 2), [0, 1, 2, 3])],
)
def test_required_subimages_released_values(grid, expect_glo):
    dem = DEM(32, 2)
    need_loc, need_glo = dem.required_subimages(grid, (24, 24))
    assert need_loc.all()
    assert need_glo.nonzero().flatten().tolist() == expect_glo


def test_required_subimages_are_tight_and_avg_needs_all():
    """Each required strided sub-image does change the output (the set is not just 'everything')."""
    dem = _randomise(DEM(32, 2))
    loc, glo = _feats(1, (3, 3), 16, 32)
    base = dem(loc, glo, (3, 3))
    for k in range(9):
        g = glo.clone()
        g[k] += 1.0
        changed = not torch.equal(dem(loc, g, (3, 3)), base)
        assert changed == (k == 4)
    assert all(m.all() for m in DEM(32, 2, reduction="avg").required_subimages((3, 3), (4, 4)))


def test_num_tokens_and_documented_shapes():
    grid, t = (2, 3), 16
    loc, glo = _feats(2, grid, t, 32)
    for fusion, reduction in itertools.product(FUSIONS, REDUCTIONS):
        dem = DEM(32, 4, fusion=fusion, reduction=reduction)
        out = dem(loc, glo, grid)
        expect = 8 * 12 if reduction == "none" else 16
        assert out.shape == (2, expect, 32) == (2, dem.num_tokens(grid, (4, 4)), 32), (fusion, reduction)
    assert DEM(32, 4, reduction="area", output_size=(3, 5))(loc, glo, grid).shape == (2, 15, 32)
    assert DEM(32, 4).num_tokens((3, 3), (24, 24)) == 576


def test_non_square_tiles_need_tile_size():
    dem = _randomise(DEM(32, 2))
    loc, glo = _feats(1, (2, 2), 12, 32)
    out = dem(loc, glo, (2, 2), tile_size=(3, 4))
    assert out.shape == (1, 12, 32)
    dem.skip_unread = False
    torch.testing.assert_close(dem(loc, glo, (2, 2), tile_size=(3, 4)), out, rtol=1e-5, atol=1e-5)


# ---- properties -----------------------------------------------------------------------------------


def test_batch_permutation_permutes_outputs():
    dem = _randomise(DEM(32, 2))
    loc, glo = _feats(3, (2, 2), 9, 32)
    out = dem(loc, glo, (2, 2))
    perm = torch.tensor([2, 0, 1])
    idx = (perm[:, None] * 4 + torch.arange(4)).flatten()
    torch.testing.assert_close(dem(loc[idx], glo[idx], (2, 2)), out[perm])


def test_pairings_differ_on_asymmetric_inputs():
    released = _randomise(DEM(32, 2, reduction="none"))
    paper = DEM(32, 2, pairing="paper", reduction="none")
    paper.load_state_dict(released.state_dict())
    loc, glo = _feats(1, (2, 2), 16, 32)
    assert (released(loc, glo, (2, 2)) - paper(loc, glo, (2, 2))).abs().max() > 1e-2


def test_grid_1x1_is_plain_cross_attention():
    dem = _randomise(DEM(32, 2, directions="global", fusion="add", reduction="none"))
    loc, glo = _feats(2, (1, 1), 9, 32)
    a = dem.attention
    q, k, v = (a.linears[i](x).view(2, 9, 2, 16).transpose(1, 2) for i, x in ((0, glo), (1, loc), (2, loc)))
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 9, 32)
    expect = a.ln(a.linears[3](plain) + glo) + loc
    torch.testing.assert_close(dem(loc, glo, (1, 1)), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_forward_and_grad_follow_tolerance_rule(dtype):
    dem64 = _randomise(DEM(80, 2, skip_unread=False), std=0.1).double()  # head dim 40
    loc, glo = _feats(1, (3, 3), 9, 80, torch.float64)
    go = torch.randn(1, 9, 80, dtype=torch.float64)

    def run(dt, skip, backend):
        m = DEM(80, 2, skip_unread=skip).to(dt)
        m.load_state_dict(dem64.state_dict())
        xs = [x.detach().to(dt).requires_grad_() for x in (loc, glo)]
        out = m(*xs, (3, 3), backend=backend)
        out.backward(go.to(dt))
        grads = [x.grad for x in xs] + [m.attention.linears[1].weight.grad, m.fusion.ffn_crop[0].weight.grad]
        return out, grads

    out64, g64 = run(torch.float64, False, "reference")
    out_lp, g_lp = run(dtype, False, "reference")
    for skip in (True, False):
        out, g = run(dtype, skip, "sdpa")
        assert out.dtype == dtype
        assert_close_to_reference(out, out_lp, out64, dtype, name=f"out skip={skip}")
        for i, (a, b, c) in enumerate(zip(g, g_lp, g64)):
            assert_close_to_reference(a, b, c, dtype, name=f"grad {i} skip={skip}")


def test_gradcheck_float64_tiny():
    dem = _randomise(DEM(16, 2)).double()
    loc, glo = (x.requires_grad_() for x in _feats(1, (2, 2), 4, 16, torch.float64))
    assert torch.autograd.gradcheck(lambda a, b: dem(a, b, (2, 2)), (loc, glo), fast_mode=True)
    dem.skip_unread = False
    assert torch.autograd.gradcheck(lambda a, b: dem(a, b, (2, 2)), (loc, glo), fast_mode=True)


@pytest.mark.parametrize("skip", [True, False])
def test_torch_compile_fullgraph(skip):
    torch._dynamo.reset()
    dem = _randomise(DEM(32, 2, skip_unread=skip))
    loc, glo = _feats(1, (3, 3), 16, 32)
    compiled = torch.compile(dem, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(loc, glo, (3, 3)), dem(loc, glo, (3, 3)))


@pytest.mark.parametrize(
    "cfg", [dict(), dict(residual_norm=False, fusion="linear_concat", reduction="avg")], ids=["released", "pooled"]
)
def test_torch_compile_fullgraph_aot_eager_with_backward(cfg):
    """AOT autograd traces forward and backward (fake tensors, functionalisation) without a graph break."""
    torch._dynamo.reset()
    dem = _randomise(DEM(32, 2, **cfg))
    loc, glo = _feats(1, (3, 3), 16, 32)
    xs = [x.clone().requires_grad_() for x in (loc, glo)]
    out = torch.compile(dem, fullgraph=True, backend="aot_eager")(*xs, (3, 3))
    out.sum().backward()
    ys = [x.clone().requires_grad_() for x in (loc, glo)]
    ref = dem(*ys, (3, 3))
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    for a, b in zip(xs, ys):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.slow  # ~50 s cold on the 2-core CI CPU (C++ compilation); ~10 s with a warm inductor cache
def test_torch_compile_fullgraph_inductor():
    """The default inductor backend (generated C++ on CPU) on a tiny configuration, skipping path included."""
    torch._dynamo.reset()
    dem = _randomise(DEM(32, 2))
    loc, glo = _feats(1, (3, 3), 16, 32)
    compiled = torch.compile(dem, fullgraph=True)
    torch.testing.assert_close(compiled(loc, glo, (3, 3)), dem(loc, glo, (3, 3)), rtol=1e-5, atol=1e-5)


def test_constructor_device_and_dtype():
    dem = DEM(32, 2, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 for p in dem.parameters())
    loc, glo = _feats(1, (2, 2), 4, 32, torch.float64)
    assert dem(loc, glo, (2, 2)).dtype == torch.float64


# ---- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,names",
    [
        (dict(dim=30, heads=4), ["dim=30", "heads=4"]),
        (dict(pairing="mirror"), ["pairing='mirror'", "('released', 'paper')"]),
        (dict(directions="up"), ["directions='up'", "'both'", "'global'", "'local'", "'none'"]),
        (dict(fusion="concat"), ["fusion='concat'", "'released'", "'linear_concat'", "'conv3x3'"]),
        (dict(reduction="max"), ["reduction='max'", "'bilinear'", "'avg'", "'area'", "'none'"]),
        (dict(dim=40, heads=4, fusion="released"), ["dim=40", "'released'", "16"]),
        (dict(reduction="none", output_size=4), ["output_size=4", "reduction='none'"]),
    ],
)
def test_bad_configurations(kw, names):
    args = dict(dim=32, heads=2)
    args.update(kw)
    with raises_naming(ValueError, *names):
        DEM(**args)


def test_bad_inputs():
    dem = DEM(32, 2)
    loc, glo = _feats(1, (2, 2), 16, 32)
    with raises_naming(ValueError, "local_feats (4, 16, 32)", "global_feats (4, 9, 32)"):
        dem(loc, glo[:, :9], (2, 2))
    with raises_naming(ValueError, "local_feats", "(4, 16, 32)", "N = gh*gw = 3*3 = 9", "grid"):
        dem(loc, glo, (3, 3))
    with raises_naming(ValueError, "(4, 12, 32)", "12 tokens", "tile_size="):
        dem(loc[:, :12], glo[:, :12], (2, 2))
    with raises_naming(ValueError, "(4, 16, 32)", "16 tokens", "tile_size=(3, 3)", "9"):
        dem(loc, glo, (2, 2), tile_size=(3, 3))
    with raises_naming(ValueError, "D=16", "dim=32"):
        dem(loc[..., :16], glo[..., :16], (2, 2))
    with raises_naming(ValueError, "local_feats", "(16, 32)", "2 dims", "3 dims"):
        dem(loc[0], glo[0], (2, 2))
    with raises_naming(ValueError, "mode='avg'", "height 8", "height 3", "mode='area'"):
        DEM(32, 2, reduction="avg", output_size=3)(loc, glo, (2, 2))


def test_attention_backend_switch_reaches_full_path():
    dem = _randomise(DEM(32, 2, skip_unread=False))
    loc, glo = _feats(1, (2, 2), 4, 32)
    with hrperc.attention_backend("reference"):
        a = dem(loc, glo, (2, 2))
    torch.testing.assert_close(a, dem(loc, glo, (2, 2), backend="sdpa"), rtol=1e-5, atol=1e-5)


def test_error_messages_name_the_value_and_the_fix():
    with raises_naming(ValueError, "pairing='mirror'", "('released', 'paper')"):
        DEM(32, 2, pairing="mirror")
    with raises_naming(ValueError, "fusion='concat'", "('released',"):
        DEM(32, 2, fusion="concat")
    dem = DEM(32, 2)
    loc, glo = _feats(1, (2, 2), 16, 32)
    with raises_naming(ValueError, "D=16", "(4, 16, 16)", "dim=32", "DualPerspectiveEnhancement(dim=16, heads=...)"):
        dem(loc[..., :16], glo[..., :16], (2, 2))
    fuse = hrperc.modules.Fusion(8, "conv3x3")
    with raises_naming(ValueError, "mode='conv3x3'", "(2, 4, 8)", "L = 4", "hw=None", "hw=(gh*ht, gw*wt)"):
        fuse(torch.zeros(2, 4, 8), torch.zeros(2, 4, 8))
    with raises_naming(ValueError, "(2, 4, 8)", "L = 4", "hw=(3, 3)"):
        fuse(torch.zeros(2, 4, 8), torch.zeros(2, 4, 8), hw=(3, 3))
    with raises_naming(ValueError, "mode='mean'", "('bilinear',"):
        hrperc.ops.reduce_tokens(torch.zeros(1, 4, 4, 2), (2, 2), "mean")
    with raises_naming(ValueError, "mode='avg'", "size=None", "size=(oh, ow)"):
        hrperc.ops.reduce_tokens(torch.zeros(1, 4, 4, 2), None, "avg")


# ---- which path runs, and the attention backend on each ------------------------------------------


def test_footprint_of_every_token_computes_every_token_directly(monkeypatch):
    """Bilinear by 2 and reduction='none' read every token: no gathers, the every-token path itself."""
    calls = []
    monkeypatch.setattr(DEM, "_forward_read", lambda self, *a: calls.append(a) or pytest.fail("gathered"))
    loc, glo = _feats(2, (2, 2), 16, 32)
    for cfg in (dict(), dict(reduction="none"), dict(fusion="maxpool", pairing="paper")):
        dem = _randomise(DEM(32, 2, **cfg))
        assert dem._plan((2, 2), (4, 4)).reads_all
        fast = dem(loc, glo, (2, 2))
        dem.skip_unread = False
        assert torch.equal(fast, dem(loc, glo, (2, 2)))
    monkeypatch.undo()
    assert not DEM(32, 2)._plan((3, 3), (4, 4)).reads_all  # bilinear by 3 reads 1/9: the footprint path


@pytest.mark.parametrize("fusion", ["linear_concat", "add", "weighted_add"])
@pytest.mark.parametrize("reduction,out", [("avg", None), ("area", None), ("area", (3, 5)), ("avg", (2, 4))])
def test_average_pooling_runs_before_the_affine_maps(monkeypatch, fusion, reduction, out):
    """Pool, then out_proj and fusion on oh*ow tokens: equal to pooling last (fp32, 1e-5 relative), grads too."""
    dem = _randomise(DEM(32, 2, residual_norm=False, fusion=fusion, reduction=reduction, output_size=out))
    if fusion == "weighted_add":
        with torch.no_grad():
            dem.fusion.weights.copy_(torch.tensor([0.7, -1.3]))
    loc, glo = _feats(2, (2, 4), 16, 32)
    widths = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(
        torch.nn.functional, "linear", lambda x, w, b=None: widths.append(x.shape[:-1].numel()) or real_linear(x, w, b)
    )
    xs = [x.clone().requires_grad_() for x in (loc, glo)]
    fast = dem(*xs, (2, 4))
    monkeypatch.undo()
    tokens_out, tokens_in = fast.shape[0] * fast.shape[1], loc.shape[0] * loc.shape[1]
    assert widths.count(tokens_out) >= 2 and set(widths) == {tokens_out, tokens_in}  # out_proj on oh*ow tokens
    fast.backward(torch.ones_like(fast))
    dem.skip_unread = False
    ys = [x.clone().requires_grad_() for x in (loc, glo)]
    full = dem(*ys, (2, 4))
    full.backward(torch.ones_like(full))
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5 * full.abs().max().item())
    for a, b in zip(xs, ys):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5 * b.grad.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pooled_path_low_precision_follows_tolerance_rule(dtype):
    cfg = dict(residual_norm=False, fusion="linear_concat", reduction="avg")
    dem64 = _randomise(DEM(80, 2, skip_unread=False, **cfg), std=0.1).double()
    loc, glo = _feats(1, (3, 3), 9, 80, torch.float64)

    def run(dt, skip):
        m = DEM(80, 2, skip_unread=skip, **cfg).to(dt)
        m.load_state_dict(dem64.state_dict())
        xs = [x.detach().to(dt).requires_grad_() for x in (loc, glo)]
        out = m(*xs, (3, 3), backend="reference")
        out.square().sum().backward()
        return out, [x.grad for x in xs] + [m.attention.linears[3].weight.grad]

    out64, g64 = run(torch.float64, False)
    out_lp, g_lp = run(dtype, False)
    out, g = run(dtype, True)
    assert_close_to_reference(out, out_lp, out64, dtype, name="pooled out")
    for i, (a, b, c) in enumerate(zip(g, g_lp, g64)):
        assert_close_to_reference(a, b, c, dtype, name=f"pooled grad {i}")


def test_pooled_path_gradcheck_float64():
    dem = _randomise(DEM(16, 2, residual_norm=False, fusion="linear_concat", reduction="avg")).double()
    loc, glo = (x.requires_grad_() for x in _feats(1, (2, 2), 4, 16, torch.float64))
    assert dem._path((2, 2), (2, 2)) == "pooled"
    assert torch.autograd.gradcheck(lambda a, b: dem(a, b, (2, 2)), (loc, glo), fast_mode=True)


def test_no_index_tensors_are_rebuilt_per_forward(monkeypatch):
    """After a first call, forwards build no torch.tensor from Python lists (index plans are cached)."""
    loc, glo = _feats(1, (4, 4), 9, 32)
    cfgs = [dict(), dict(output_size=(2, 2)), dict(reduction="area", fusion="multiply")]
    dems = [_randomise(DEM(32, 2, **cfg)) for cfg in cfgs]
    for dem in dems:
        dem(loc, glo, (4, 4))
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: pytest.fail("torch.tensor called in a forward"))
    for dem in dems:
        dem(loc, glo, (4, 4))


def test_index_caches_built_under_inference_mode_serve_autograd_later():
    dem = _randomise(DEM(32, 2, output_size=(2, 2)))  # bilinear by 6: weighted taps and gathers
    loc, glo = _feats(1, (3, 3), 16, 32)
    with torch.inference_mode():
        dem(loc, glo, (3, 3))
    x = loc.clone().requires_grad_()
    dem(x, glo, (3, 3)).sum().backward()
    assert x.grad is not None


@pytest.fixture
def spies():
    """Two registered backends that count their calls: one attends query subsets, one whole windows only."""
    calls = {"windows.fn": 0, "subset.fn": 0, "subset.query_subset": 0}

    def counted(key, fn):
        def wrapper(*args, **kw):
            calls[key] += 1
            return fn(*args, **kw)

        return wrapper

    register_backend(AttentionBackend("spy_windows", counted("windows.fn", sdpa_window_attention)))
    try:
        register_backend(
            AttentionBackend(
                "spy_subset",
                counted("subset.fn", sdpa_window_attention),
                query_subset=counted("subset.query_subset", sdpa_query_subset),
            )
        )
        try:
            yield calls
        finally:
            unregister_backend("spy_subset")
    finally:
        unregister_backend("spy_windows")


def _force(how, name, monkeypatch):
    """Run a default-config DEM forward with ``name`` forced ``how``; returns the module, inputs, output."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    dem = _randomise(DEM(32, 2))  # default: skip_unread=True, released configuration
    loc, glo = _feats(1, (3, 3), 16, 32)
    if how == "argument":
        out = dem(loc, glo, (3, 3), backend=name)
    elif how == "context":
        with hrperc.attention_backend(name):
            out = dem(loc, glo, (3, 3))
    else:
        monkeypatch.setenv(ENV_VAR, name)
        out = dem(loc, glo, (3, 3))
        monkeypatch.delenv(ENV_VAR)
    return dem, (loc, glo), out


@pytest.mark.parametrize("how", ["argument", "context", "env"])
def test_default_dem_runs_a_forced_backend_with_a_query_subset_form(how, spies, monkeypatch):
    dem, (loc, glo), out = _force(how, "spy_subset", monkeypatch)
    assert spies == {"windows.fn": 0, "subset.fn": 0, "subset.query_subset": 2}  # skipping path, both directions
    assert torch.equal(out, dem(loc, glo, (3, 3)))


@pytest.mark.parametrize("how", ["argument", "context", "env"])
def test_default_dem_forced_onto_a_whole_window_backend_computes_every_token_with_it(how, spies, monkeypatch):
    dem, (loc, glo), out = _force(how, "spy_windows", monkeypatch)
    assert spies == {"windows.fn": 2, "subset.fn": 0, "subset.query_subset": 0}  # every token, both directions
    dem.skip_unread = False
    torch.testing.assert_close(out, dem(loc, glo, (3, 3), backend="sdpa"), rtol=1e-5, atol=1e-5)


def test_default_dem_auto_uses_sdpa_subsets_and_forced_reference_uses_no_sdpa(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    sdpa_calls, ref_calls = [], []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional,
        "scaled_dot_product_attention",
        lambda q, k, v, **kw: sdpa_calls.append(q.shape) or real_sdpa(q, k, v, **kw),
    )
    ref = get_backend("reference")

    def spy_subset(q, k, v, *, scale):
        ref_calls.append(q.shape)
        return ref.query_subset(q, k, v, scale=scale)

    register_backend(dataclasses.replace(ref, query_subset=spy_subset), replace=True)
    try:
        dem = _randomise(DEM(32, 2))
        loc, glo = _feats(1, (3, 3), 16, 32)
        auto = dem(loc, glo, (3, 3))
        assert len(sdpa_calls) == 2 and sum(s[0] * s[2] for s in sdpa_calls) < 2 * 9 * 16  # a subset of the queries
        assert ref_calls == []
        sdpa_calls.clear()
        with hrperc.attention_backend("reference"):
            forced = dem(loc, glo, (3, 3))
        assert sdpa_calls == [] and len(ref_calls) == 2
        torch.testing.assert_close(forced, auto, rtol=1e-5, atol=1e-5)
    finally:
        register_backend(ref, replace=True)
    assert get_backend("reference") is ref


def test_default_dem_forced_triton_runs_the_kernel(monkeypatch):
    """Forcing "triton" on the default (skipping) DEM runs the kernel on every token (it takes whole windows)."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    dem = _randomise(DEM(64, 2), std=0.1)  # head_dim 32
    loc, glo = _feats(1, (3, 3), 16, 64)
    probe = loc.unflatten(-1, (2, 32))
    triton = get_backend("triton")
    reason = triton.supports(probe, probe, probe)
    if reason is not None:
        with raises_naming(NotImplementedError, "'triton'", reason):
            dem(loc, glo, (3, 3), backend="triton")
        return
    calls = []
    spy = dataclasses.replace(triton, fn=lambda *a, **kw: calls.append(kw["window"]) or triton.fn(*a, **kw))
    register_backend(spy, replace=True)
    try:
        out = dem(loc, glo, (3, 3), backend="triton")
    finally:
        register_backend(triton, replace=True)
    assert sorted(calls) == ["contiguous", "strided"]
    torch.testing.assert_close(out, dem(loc, glo, (3, 3), backend="sdpa"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(),
        dict(skip_unread=False),
        dict(directions="none", fusion="add"),
        dict(residual_norm=False, fusion="add", reduction="avg"),
        dict(fusion="conv3x3"),
    ],
    ids=["released", "every-token", "no-attention", "pooled", "conv3x3"],
)
def test_unknown_backend_names_raise_on_every_path(cfg, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    dem = DEM(32, 2, **cfg)
    loc, glo = _feats(1, (3, 3), 16, 32)
    with raises_naming(ValueError, "backend='bogus'", "'sdpa'", "'auto'"):
        dem(loc, glo, (3, 3), backend="bogus")
    monkeypatch.setenv(ENV_VAR, "bogus")
    with raises_naming(ValueError, "$HRPERC_ATTN_BACKEND='bogus'", "'sdpa'", "'auto'"):
        dem(loc, glo, (3, 3))
    with pytest.raises(ValueError, match="name='bogus'"):
        with hrperc.attention_backend("bogus"):
            pass
