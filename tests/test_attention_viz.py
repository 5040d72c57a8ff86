"""dem_attention's probabilities reproduce the DEM attention's own output at the query token."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _messages import raises_naming

from hrperc import DualPerspectiveEnhancement, local_merge, stride_merge
from hrperc.cli.attention_plot import dem_attention, plot_dem_attention


@pytest.mark.parametrize("pairing", ["released", "paper"])
@pytest.mark.parametrize("direction", ["global", "local"])
@pytest.mark.parametrize("query", [(0, 0), (7, 4), (11, 8)])
def test_probs_reproduce_attention_output(pairing, direction, query):
    torch.manual_seed(0)
    grid, tile, D = (3, 2), (4, 5), 32
    dem = DualPerspectiveEnhancement(D, heads=4, pairing=pairing)
    loc, glo = torch.randn(6, 20, D), torch.randn(6, 20, D)
    att = dem_attention(dem, loc, glo, grid, tile, query=query, direction=direction)
    assert att.probs.shape == (4, 12, 10) and att.window_mask.sum() == 20
    torch.testing.assert_close(att.probs.sum((1, 2)), torch.ones(4))
    assert not att.probs[:, ~att.window_mask].any()

    attn = dem.attention
    q_feats, kv_feats = (glo, loc) if direction == "global" else (loc, glo)
    q_order, kv_order = ("strided", "contiguous") if direction == "global" else ("contiguous", "strided")
    with torch.no_grad():
        full = attn(
            q_feats,
            kv_feats,
            grid,
            window=att.window,
            q_order=q_order,
            kv_order=kv_order,
            out_order="map",
            tile_size=tile,
        )[0, query[0] * 10 + query[1]]
        lm = local_merge(loc.reshape(6, 4, 5, D), grid, layout="nhwc")[0]
        gm = stride_merge(glo.reshape(6, 4, 5, D), grid, layout="nhwc")[0]
        qm, kvm = (gm, lm) if direction == "global" else (lm, gm)
        v = F.linear(kvm, attn.linears[2].weight, attn.linears[2].bias).view(12, 10, 4, 8)
        o = torch.einsum("hrc,rchd->hd", att.probs, v).reshape(D)
        ref = attn.ln(F.linear(o, attn.linears[3].weight, attn.linears[3].bias) + qm[query])
    torch.testing.assert_close(ref, full, rtol=1e-4, atol=1e-5)


def test_windows_follow_pairing():
    dem = DualPerspectiveEnhancement(32, heads=4)
    loc = glo = torch.randn(9, 16, 32)
    g = dem_attention(dem, loc, glo, (3, 3), (4, 4), (5, 6), "global")
    l_ = dem_attention(dem, loc, glo, (3, 3), (4, 4), (5, 6), "local")
    assert (g.window, l_.window) == ("contiguous", "strided")
    assert g.window_mask[4:8, 4:8].all() and g.window_mask.sum() == 16
    assert l_.window_mask[2::3, 0::3].all() and l_.window_mask.sum() == 16


def test_errors_and_plot(tmp_path):
    dem = DualPerspectiveEnhancement(32, heads=4)
    loc = torch.randn(9, 16, 32)
    with raises_naming(ValueError, "query=(12, 0)", "12x12"):
        dem_attention(dem, loc, loc, (3, 3), (4, 4), (12, 0))
    with raises_naming(ValueError, "(18, 16, 32)", "(9, 16, D)", "grid (3, 3)", "tile (4, 4)"):
        dem_attention(dem, torch.randn(18, 16, 32), loc, (3, 3), (4, 4), (0, 0))
    atts = [dem_attention(dem, loc, loc, (3, 3), (4, 4), (5, 6), d) for d in ("global", "local")]
    plot_dem_attention(torch.rand(3, 48, 48), atts, patch_size=4, path=tmp_path / "att.png")
    assert (tmp_path / "att.png").stat().st_size > 1000
