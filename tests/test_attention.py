"""window_attention / window_cross_attention / WindowCrossAttention: backends agree with the spec."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from _tolerance import assert_close_to_reference

import hrperc
from hrperc import attention as A
from hrperc.ops.crop import crop, merge

KINDS = ("contiguous", "strided")


def _literal(q, k, v, grid, tile, window, q_order, kv_order):
    """Spec by hand: maps, explicit window loop, softmax; returns the (B, Ht*Wt, h, d) output map."""
    gh, gw = grid
    th, tw = tile
    bn, t, h, d = q.shape
    qm = merge(q.reshape(bn, t, -1), grid, q_order, layout="nlc", tile_size=tile).view(-1, gh * th, gw * tw, h, d)
    km = merge(k.reshape(bn, t, -1), grid, kv_order, layout="nlc", tile_size=tile).view(qm.shape)
    vm = merge(v.reshape(bn, t, -1), grid, kv_order, layout="nlc", tile_size=tile).view(qm.shape)
    out = torch.zeros_like(qm)
    for i, j in itertools.product(range(gh), range(gw)):
        if window == "contiguous":
            sl = (slice(None), slice(i * th, (i + 1) * th), slice(j * tw, (j + 1) * tw))
        else:
            sl = (slice(None), slice(i, None, gh), slice(j, None, gw))
        qw, kw, vw = (x[sl].reshape(x.shape[0], -1, h, d).transpose(1, 2) for x in (qm, km, vm))
        p = torch.softmax(qw @ kw.transpose(-1, -2) / d**0.5, -1)
        out[sl] = (p @ vw).transpose(1, 2).reshape(out[sl].shape)
    return out.reshape(out.shape[0], -1, h, d)


@pytest.mark.parametrize("window,q_order,kv_order", list(itertools.product(KINDS, KINDS, KINDS)))
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_backends_match_literal_every_order(window, q_order, kv_order, backend):
    grid, tile = (2, 3), (3, 2)  # all different sizes, so a transposed axis fails
    q, k, v = (torch.randn(2 * 6, 6, 2, 4, dtype=torch.float64) for _ in range(3))
    ref = _literal(q, k, v, grid, tile, window, q_order, kv_order)
    for out_order in ("map", "contiguous", "strided"):
        out = hrperc.window_attention(q, k, v, grid, window=window, q_order=q_order, kv_order=kv_order,
                                      out_order=out_order, tile_size=tile, backend=backend)  # fmt: skip
        if out_order != "map":
            out = merge(out.reshape(12, 6, -1), grid, out_order, layout="nlc", tile_size=tile).view(ref.shape)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_default_out_order_is_window():
    q = torch.randn(9, 16, 1, 8)
    out = hrperc.window_attention(q, q, q, (3, 3), window="strided", q_order="contiguous", kv_order="contiguous")
    full = hrperc.window_attention(q, q, q, (3, 3), window="strided", q_order="contiguous", kv_order="contiguous",
                                   out_order="map")  # fmt: skip
    torch.testing.assert_close(out, crop(full.reshape(1, 144, 8), (3, 3), "strided", layout="nlc").view(out.shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "heads,head_dim,grid,tile", [(2, 40, (3, 3), (3, 3)), (1, 80, (1, 3), (5, 3)), (3, 16, (2, 2), (4, 4))]
)
def test_sdpa_vs_reference_forward_and_grad(dtype, heads, head_dim, grid, tile):
    n, t = grid[0] * grid[1], tile[0] * tile[1]
    base = [torch.randn(2 * n, t, heads, head_dim * 2, dtype=torch.float64) for _ in range(3)]
    # Non-contiguous inputs: every other channel of a wider tensor.
    q64, k64, v64 = (b[..., ::2].requires_grad_() for b in base)
    kw = dict(window="contiguous", q_order="strided", kv_order="contiguous", out_order="map", tile_size=tile)
    go = torch.randn(2, n * t, heads, head_dim, dtype=torch.float64)

    def run(dt, backend):
        xs = [x.detach().to(dt).requires_grad_() for x in (q64, k64, v64)]
        out = hrperc.window_attention(*xs, grid, backend=backend, **kw)
        out.backward(go.to(dt))
        return out, [x.grad for x in xs]

    out64, g64 = run(torch.float64, "reference")
    out_lp, g_lp = run(dtype, "reference")
    out_fast, g_fast = run(dtype, "sdpa")
    assert out_fast.dtype == dtype
    assert_close_to_reference(out_fast, out_lp, out64, dtype)
    for name, a, b, c in zip("qkv", g_fast, g_lp, g64):
        assert_close_to_reference(a, b, c, dtype, name=f"d{name}")


def test_gradcheck_float64():
    q, k, v = (torch.randn(4, 4, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for backend in ("reference", "sdpa"):
        assert torch.autograd.gradcheck(
            lambda a, b, c, backend=backend: hrperc.window_attention(
                a, b, c, (2, 2), window="strided", q_order="contiguous", kv_order="strided", out_order="map",
                backend=backend),
            (q, k, v),
            fast_mode=True,
        )  # fmt: skip


def test_grid_1x1_is_plain_attention():
    q, k, v = (torch.randn(3, 20, 2, 8) for _ in range(3))
    out = hrperc.window_attention(q, k, v, 1, window="strided", q_order="contiguous", kv_order="strided",
                                  tile_size=(4, 5))  # fmt: skip
    plain = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, plain)


def test_custom_scale_is_used():
    q, k, v = (torch.randn(4, 4, 1, 8, dtype=torch.float64) for _ in range(3))
    kw = dict(window="contiguous", q_order="contiguous", kv_order="contiguous")
    a = hrperc.window_attention(q, k, v, (2, 2), scale=0.5, backend="sdpa", **kw)
    b = hrperc.window_attention(q * 0.5 * 8**0.5, k, v, (2, 2), backend="reference", **kw)
    torch.testing.assert_close(a, b)


def test_cross_attention_functional_matches_manual():
    d, h = 24, 3
    w = [torch.randn(d, d, dtype=torch.float64) / d**0.5 for _ in range(4)]
    bs = [torch.randn(d, dtype=torch.float64) for _ in range(4)]
    qf, kvf = torch.randn(2 * 4, 9, d, dtype=torch.float64), torch.randn(2 * 4, 9, d, dtype=torch.float64)
    out = hrperc.attention.window_cross_attention(
        qf, kvf, (2, 2), "strided", "contiguous", "strided", q_weight=w[0], q_bias=bs[0], k_weight=w[1],
        k_bias=bs[1], v_weight=w[2], v_bias=bs[2], out_weight=w[3], out_bias=bs[3], heads=h,
    )  # fmt: skip
    q, k, v = (F.linear(x, wi, bi).view(8, 9, h, d // h) for x, wi, bi in ((qf, w[0], bs[0]), (kvf, w[1], bs[1]),
                                                                            (kvf, w[2], bs[2])))  # fmt: skip
    att = _literal(q, k, v, (2, 2), (3, 3), "strided", "contiguous", "strided").reshape(2, 36, d)
    torch.testing.assert_close(out, F.linear(att, w[3], bs[3]))


def test_module_residual_is_unprojected_query_and_ln():
    attn = hrperc.WindowCrossAttention(16, heads=2).double()
    qf, kvf = torch.randn(4, 4, 16, dtype=torch.float64), torch.randn(4, 4, 16, dtype=torch.float64)
    kw = dict(window="contiguous", q_order="strided", kv_order="contiguous")
    out = attn(qf, kvf, (2, 2), **kw)
    attn_off = hrperc.WindowCrossAttention(16, heads=2, residual_norm=False).double()
    attn_off.load_state_dict({k: v for k, v in attn.state_dict().items() if not k.startswith("ln")})
    raw = attn_off(qf, kvf, (2, 2), **kw)
    q_map = merge(qf, (2, 2), "strided", layout="nlc")
    torch.testing.assert_close(out, attn.ln(raw + q_map))
    # Window-order output is the same tokens, re-ordered.
    out_w = attn(qf, kvf, (2, 2), out_order="contiguous", **kw)
    torch.testing.assert_close(merge(out_w, (2, 2), "contiguous", layout="nlc"), out)
    assert [k for k in attn.state_dict()][:2] == ["linears.0.weight", "linears.0.bias"]


# ---- dispatch -------------------------------------------------------------------------------------


def _qkv():
    return (torch.randn(4, 4, 1, 8) for _ in range(3))


KW = dict(window="contiguous", q_order="contiguous", kv_order="contiguous")


def test_auto_is_sdpa_on_cpu_and_forcing_works(monkeypatch):
    q, k, v = _qkv()
    norm = dict(grid=(2, 2), tile_size=(2, 2), out_order="contiguous", scale=1.0, **KW)
    monkeypatch.delenv(A.ENV_VAR, raising=False)
    assert A.resolve_backend("auto", q, k, v, **norm) == "sdpa"
    with hrperc.attention_backend("reference"):
        assert A.resolve_backend("auto", q, k, v, **norm) == "reference"
        assert A.resolve_backend("sdpa", q, k, v, **norm) == "sdpa"  # explicit argument wins
    monkeypatch.setenv(A.ENV_VAR, "reference")
    assert A.resolve_backend("auto", q, k, v, **norm) == "reference"
    with hrperc.attention_backend("sdpa"):  # context manager beats the environment
        assert A.resolve_backend("auto", q, k, v, **norm) == "sdpa"


def test_forced_backend_is_actually_called(monkeypatch):
    calls = []

    def spy(q, k, v, **kw):
        calls.append(kw)
        return A.sdpa_window_attention(q, k, v, **kw)

    hrperc.attention.register_backend("spy", spy)
    try:
        q, k, v = _qkv()
        with hrperc.attention_backend("spy"):
            hrperc.window_attention(q, k, v, (2, 2), **KW)
        assert len(calls) == 1 and calls[0]["tile_size"] == (2, 2) and calls[0]["scale"] == pytest.approx(8**-0.5)
    finally:
        A._REGISTRY.pop("spy")


def test_forced_backend_that_cannot_run_explains(monkeypatch):
    hrperc.attention.register_backend("never", A.sdpa_window_attention, lambda q, k, v, **kw: "needs a GPU")
    try:
        q, k, v = _qkv()
        with pytest.raises(NotImplementedError) as err:
            hrperc.window_attention(q, k, v, (2, 2), backend="never", **KW)
        msg = str(err.value)
        assert "needs a GPU" in msg and "(4, 4, 1, 8)" in msg and "torch.float32" in msg and "sdpa: can run" in msg
    finally:
        A._REGISTRY.pop("never")


def test_unknown_backend_names_are_refused(monkeypatch):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="'nope'.*registered"):
        hrperc.window_attention(q, k, v, (2, 2), backend="nope", **KW)
    with pytest.raises(ValueError, match="nope"):
        with hrperc.attention_backend("nope"):
            pass
    monkeypatch.setenv(A.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="HRPERC_ATTN_BACKEND"):
        hrperc.window_attention(q, k, v, (2, 2), **KW)


@pytest.mark.parametrize(
    "shapes,kw,match",
    [
        (((4, 4, 1, 8),) * 3, dict(window="diagonal"), "window='diagonal'"),
        (((4, 4, 1, 8),) * 3, dict(q_order="rows"), "q_order='rows'"),
        (((4, 4, 1, 8),) * 3, dict(out_order="nlc"), "out_order='nlc'"),
        (((4, 4, 8),) * 3, {}, r"\(B\*N, T, heads, head_dim\)"),
        (((4, 4, 1, 8), (4, 9, 1, 8), (4, 9, 1, 8)), {}, "same shape"),
        (((6, 4, 1, 8),) * 3, {}, "multiple of N = 2\\*2 = 4"),
        (((4, 6, 1, 8),) * 3, {}, "not a perfect square"),
        (((4, 6, 1, 8),) * 3, dict(tile_size=(2, 2)), "tile_size=\\(2, 2\\) holds 4"),
    ],
)
def test_bad_inputs_name_the_values(shapes, kw, match):
    q, k, v = (torch.randn(s) for s in shapes)
    args = dict(KW)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        hrperc.window_attention(q, k, v, (2, 2), **args)


def test_bad_heads_and_mismatched_stacks():
    with pytest.raises(ValueError, match="heads=3.*dividing dim"):
        hrperc.WindowCrossAttention(16, heads=3)
    attn = hrperc.WindowCrossAttention(16, heads=2)
    with pytest.raises(ValueError, match=r"query_feats \(4, 4, 16\) and kv_feats \(4, 9, 16\)"):
        attn(torch.randn(4, 4, 16), torch.randn(4, 9, 16), (2, 2), **KW)
    with pytest.raises(ValueError, match="D=8"):
        attn(torch.randn(4, 4, 8), torch.randn(4, 4, 8), (2, 2), **KW)


def test_unknown_option_messages_say_what_to_pass():
    q, k, v = _qkv()
    with pytest.raises(
        ValueError, match=r"window='diagonal' is not a known window; pass one of \('contiguous', 'strided'\)"
    ):
        hrperc.window_attention(q, k, v, (2, 2), **{**KW, "window": "diagonal"})
    with pytest.raises(
        ValueError, match=r"backend='nope' is not a registered backend; pass one of \('reference', 'sdpa'"
    ):
        hrperc.window_attention(q, k, v, (2, 2), backend="nope", **KW)
    with pytest.raises(ValueError, match=r"name='nope' is not a registered backend; pass one of"):
        with hrperc.attention_backend("nope"):
            pass
    with pytest.raises(TypeError, match=r"backend=3 is not a backend name"):
        hrperc.window_attention(q, k, v, (2, 2), backend=3, **KW)


def test_dtype_and_device_mismatch_names_both_and_the_fix():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"dtypes torch.float32/torch.float64/torch.float32 on devices cpu/cpu/cpu\. "
                                        r"Cast and move them together"):  # fmt: skip
        hrperc.window_attention(q, k.double(), v, (2, 2), **KW)


def test_forced_backend_precedence_and_query_subset_forms(monkeypatch):
    monkeypatch.delenv(A.ENV_VAR, raising=False)
    assert A.forced_backend("auto") is None and A.forced_backend(None) is None
    monkeypatch.setenv(A.ENV_VAR, "reference")
    assert A.forced_backend("auto") == "reference"
    with hrperc.attention_backend("sdpa"):
        assert A.forced_backend("auto") == "sdpa" and A.forced_backend("reference") == "reference"
    monkeypatch.setenv(A.ENV_VAR, "auto")
    assert A.forced_backend("auto") is None
    # Built-ins attend query subsets; unforced, the subset path is sdpa even where "auto" would pick triton.
    assert A.query_subset_fn("sdpa") is A.sdpa_query_subset and A.query_subset_fn("reference") is not None
    assert A.query_subset_fn("triton") is None
    q = torch.randn(3, 2, 5, 8, dtype=torch.float64)  # 5 of each window's 9 queries
    k, v = torch.randn(3, 2, 9, 8, dtype=torch.float64), torch.randn(3, 2, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(A.sdpa_query_subset(q, k, v, scale=0.3), A.reference_query_subset(q, k, v, scale=0.3))
    probe = torch.randn(4, 4, 1, 8)
    norm = dict(grid=(2, 2), tile_size=(2, 2), out_order="contiguous", scale=1.0, **KW)
    assert A.resolve_backend("auto", probe, probe, probe, query_subset=True, **norm) == "sdpa"
    with pytest.raises(TypeError, match="query_subset for 'x' must be callable"):
        hrperc.attention.register_backend("x", A.sdpa_window_attention, query_subset=3)


def test_attend_is_forward_before_the_output_projection():
    attn = hrperc.WindowCrossAttention(16, heads=2, residual_norm=False).double()
    qf, kvf = torch.randn(8, 4, 16, dtype=torch.float64), torch.randn(8, 4, 16, dtype=torch.float64)
    kw = dict(window="strided", q_order="contiguous", kv_order="strided")
    a = attn.attend(qf, kvf, (2, 2), **kw)
    assert a.shape == (2, 16, 16)
    torch.testing.assert_close(attn(qf, kvf, (2, 2), **kw), attn.linears[3](a))


def test_cross_attention_functional_with_missing_biases():
    d, h = 8, 2
    w = [torch.randn(d, d, dtype=torch.float64) for _ in range(4)]
    b = torch.randn(d, dtype=torch.float64)
    qf = torch.randn(4, 4, d, dtype=torch.float64)
    kw = dict(q_weight=w[0], k_weight=w[1], v_weight=w[2], out_weight=w[3], heads=h)
    out = hrperc.attention.window_cross_attention(qf, qf, (2, 2), "contiguous", "contiguous", "contiguous", v_bias=b, **kw)
    q, k, v = (F.linear(qf, wi, bi).view(4, 4, h, d // h) for wi, bi in ((w[0], None), (w[1], None), (w[2], b)))
    att = _literal(q, k, v, (2, 2), (2, 2), "contiguous", "contiguous", "contiguous").reshape(1, 16, d)
    torch.testing.assert_close(out, F.linear(att, w[3]))
