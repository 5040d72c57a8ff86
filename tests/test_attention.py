"""window_attention / window_cross_attention / WindowCrossAttention: backends agree with the spec."""

from __future__ import annotations

import dataclasses
import itertools
import re
import threading

import pytest
import torch
import torch.nn.functional as F
from _messages import assert_names, raises_naming
from _tolerance import assert_close_to_reference

import hrperc
from hrperc import attention as A
from hrperc.attention import (
    AttentionBackend,
    available_backends,
    get_backend,
    register_backend,
    unregister_backend,
)
from hrperc.attention.dispatch import ENV_VAR, forced_backend
from hrperc.attention.reference import (
    reference_query_subset,
    reference_window_attention,
    sdpa_query_subset,
    sdpa_window_attention,
)
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
        out = hrperc.window_attention(
            q,
            k,
            v,
            grid,
            window=window,
            q_order=q_order,
            kv_order=kv_order,
            out_order=out_order,
            tile_size=tile,
            backend=backend,
        )
        if out_order != "map":
            out = merge(out.reshape(12, 6, -1), grid, out_order, layout="nlc", tile_size=tile).view(ref.shape)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_default_out_order_is_window():
    q = torch.randn(9, 16, 1, 8)
    out = hrperc.window_attention(q, q, q, (3, 3), window="strided", q_order="contiguous", kv_order="contiguous")
    full = hrperc.window_attention(
        q, q, q, (3, 3), window="strided", q_order="contiguous", kv_order="contiguous", out_order="map"
    )
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
                a,
                b,
                c,
                (2, 2),
                window="strided",
                q_order="contiguous",
                kv_order="strided",
                out_order="map",
                backend=backend,
            ),
            (q, k, v),
            fast_mode=True,
        )


def test_grid_1x1_is_plain_attention():
    q, k, v = (torch.randn(3, 20, 2, 8) for _ in range(3))
    out = hrperc.window_attention(
        q, k, v, 1, window="strided", q_order="contiguous", kv_order="strided", tile_size=(4, 5)
    )
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
        qf,
        kvf,
        (2, 2),
        "strided",
        "contiguous",
        "strided",
        q_weight=w[0],
        q_bias=bs[0],
        k_weight=w[1],
        k_bias=bs[1],
        v_weight=w[2],
        v_bias=bs[2],
        out_weight=w[3],
        out_bias=bs[3],
        heads=h,
    )
    q, k, v = (
        F.linear(x, wi, bi).view(8, 9, h, d // h)
        for x, wi, bi in ((qf, w[0], bs[0]), (kvf, w[1], bs[1]), (kvf, w[2], bs[2]))
    )
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
NORM = dict(grid=(2, 2), tile_size=(2, 2), out_order="contiguous", scale=1.0, **KW)  # resolve_backend's kwargs


@pytest.fixture
def registered():
    """Register backends for one test (``registered(backend)``); every one is unregistered afterwards."""
    names = []

    def add(backend):
        names.append(register_backend(backend).name)
        return backend

    try:
        yield add
    finally:
        for name in names:
            if name in available_backends():  # a test may unregister its backends itself
                unregister_backend(name)


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def _spy(calls, fn=sdpa_window_attention):
    """A whole-window backend function that records each call's keyword arguments, then runs ``fn``."""

    def spy(q, k, v, grid, **kw):
        calls.append(dict(kw, grid=grid))
        return fn(q, k, v, grid, **kw)

    return spy


def test_auto_is_sdpa_on_cpu_and_forcing_works(monkeypatch):
    q, k, v = _qkv()
    norm = NORM
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert A.resolve_backend("auto", q, k, v, **norm).name == "sdpa"
    assert A.resolve_backend("auto", q, k, v, **norm) is get_backend("sdpa")  # the registered object itself
    with hrperc.attention_backend("reference"):
        assert A.resolve_backend("auto", q, k, v, **norm).name == "reference"
        assert A.resolve_backend("sdpa", q, k, v, **norm).name == "sdpa"  # explicit argument wins
    monkeypatch.setenv(ENV_VAR, "reference")
    assert A.resolve_backend("auto", q, k, v, **norm).name == "reference"
    with hrperc.attention_backend("sdpa"):  # context manager beats the environment
        assert A.resolve_backend("auto", q, k, v, **norm).name == "sdpa"


def test_forced_backend_is_actually_called(registered):
    calls = []
    registered(AttentionBackend("spy", _spy(calls)))
    q, k, v = _qkv()
    with hrperc.attention_backend("spy"):
        hrperc.window_attention(q, k, v, (2, 2), **KW)
    assert len(calls) == 1 and calls[0]["tile_size"] == (2, 2) and calls[0]["scale"] == pytest.approx(8**-0.5)
    assert calls[0]["grid"] == (2, 2) and calls[0]["out_order"] == "contiguous"  # normalised before the call


def test_forced_backend_that_cannot_run_explains(registered):
    registered(AttentionBackend("never", sdpa_window_attention, check=lambda q, k, v, **kw: "needs a GPU"))
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError) as err:
        hrperc.window_attention(q, k, v, (2, 2), backend="never", **KW)
    # the backend, its check's reason, the inputs, the backends that can run them, and backend='auto'
    assert_names(str(err.value), "'never'", "needs a GPU", "(4, 4, 1, 8)", "torch.float32", "sdpa", "backend='auto'")


def test_unknown_backend_names_are_refused(monkeypatch):
    q, k, v = _qkv()
    with raises_naming(ValueError, "backend='nope'", "'reference'", "'sdpa'", "'auto'"):
        hrperc.window_attention(q, k, v, (2, 2), backend="nope", **KW)
    with raises_naming(ValueError, "name='nope'", "'sdpa'"):
        with hrperc.attention_backend("nope"):
            pass
    monkeypatch.setenv(ENV_VAR, "nope")
    with raises_naming(ValueError, "HRPERC_ATTN_BACKEND", "'nope'", "'sdpa'"):
        hrperc.window_attention(q, k, v, (2, 2), **KW)


@pytest.mark.parametrize(
    "shapes,kw,names",
    [
        (((4, 4, 1, 8),) * 3, dict(window="diagonal"), ["window='diagonal'", "('contiguous', 'strided')"]),
        (((4, 4, 1, 8),) * 3, dict(q_order="rows"), ["q_order='rows'", "'contiguous'", "'strided'"]),
        (((4, 4, 1, 8),) * 3, dict(out_order="nlc"), ["out_order='nlc'", "'contiguous'", "'strided'", "'map'"]),
        (((4, 4, 8),) * 3, {}, ["(4, 4, 8)", "(B*N, T, heads, head_dim)"]),
        (((4, 4, 1, 8), (4, 9, 1, 8), (4, 9, 1, 8)), {}, ["(4, 4, 1, 8)", "(4, 9, 1, 8)"]),
        (((6, 4, 1, 8),) * 3, {}, ["(6, 4, 1, 8)", "N = gh*gw = 2*2 = 4", "grid"]),
        (((4, 6, 1, 8),) * 3, {}, ["(4, 6, 1, 8)", "6 tokens", "tile_size="]),
        (((4, 6, 1, 8),) * 3, dict(tile_size=(2, 2)), ["(4, 6, 1, 8)", "6 tokens", "tile_size=(2, 2)"]),
    ],
)
def test_bad_inputs_name_the_values(shapes, kw, names):
    q, k, v = (torch.randn(s) for s in shapes)
    args = dict(KW)
    args.update(kw)
    with raises_naming(ValueError, *names):
        hrperc.window_attention(q, k, v, (2, 2), **args)


def test_bad_heads_and_mismatched_stacks():
    with raises_naming(ValueError, "dim=16", "heads=3"):
        hrperc.WindowCrossAttention(16, heads=3)
    attn = hrperc.WindowCrossAttention(16, heads=2)
    with raises_naming(ValueError, "query_feats (4, 4, 16)", "kv_feats (4, 9, 16)"):
        attn(torch.randn(4, 4, 16), torch.randn(4, 9, 16), (2, 2), **KW)
    with raises_naming(ValueError, "D=8", "(4, 4, 8)", "dim=16"):
        attn(torch.randn(4, 4, 8), torch.randn(4, 4, 8), (2, 2), **KW)


def test_unknown_option_messages_say_what_to_pass():
    q, k, v = _qkv()
    with raises_naming(ValueError, "window='diagonal'", "('contiguous', 'strided')"):
        hrperc.window_attention(q, k, v, (2, 2), **{**KW, "window": "diagonal"})
    with raises_naming(ValueError, "backend='nope'", "('reference', 'sdpa'", "'auto'"):
        hrperc.window_attention(q, k, v, (2, 2), backend="nope", **KW)
    with raises_naming(ValueError, "name='nope'", "('reference', 'sdpa'", "'auto'", "None"):
        with hrperc.attention_backend("nope"):
            pass
    with raises_naming(TypeError, "backend=3", "('reference', 'sdpa'", "'auto'"):
        hrperc.window_attention(q, k, v, (2, 2), backend=3, **KW)


def test_dtype_and_device_mismatch_names_both_and_the_fix():
    q, k, v = _qkv()
    with raises_naming(TypeError, "torch.float32/torch.float64/torch.float32", "cpu/cpu/cpu", "k.to(q)"):
        hrperc.window_attention(q, k.double(), v, (2, 2), **KW)


def test_forced_backend_precedence_and_query_subset_forms(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert forced_backend("auto") is None and forced_backend(None) is None
    monkeypatch.setenv(ENV_VAR, "reference")
    assert forced_backend("auto") == "reference"
    with hrperc.attention_backend("sdpa"):
        assert forced_backend("auto") == "sdpa" and forced_backend("reference") == "reference"
    monkeypatch.setenv(ENV_VAR, "auto")
    assert forced_backend("auto") is None
    # Built-ins attend query subsets; unforced, the subset path is sdpa even where "auto" would pick triton.
    assert get_backend("sdpa").query_subset is sdpa_query_subset
    assert get_backend("reference").query_subset is reference_query_subset
    assert get_backend("triton").query_subset is None
    q = torch.randn(3, 2, 5, 8, dtype=torch.float64)  # 5 of each window's 9 queries
    k, v = torch.randn(3, 2, 9, 8, dtype=torch.float64), torch.randn(3, 2, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(sdpa_query_subset(q, k, v, scale=0.3), reference_query_subset(q, k, v, scale=0.3))
    probe = torch.randn(4, 4, 1, 8)
    assert A.resolve_backend("auto", probe, probe, probe, query_subset=True, **NORM).name == "sdpa"
    with raises_naming(TypeError, "'x'", "query_subset", "int"):
        AttentionBackend("x", sdpa_window_attention, query_subset=3)


@pytest.mark.parametrize(
    "fields,x,names",
    [
        (dict(devices=("cuda",)), torch.zeros(4, 4, 1, 8), ["'cpu'", "'cuda'"]),
        (dict(dtypes=(torch.float64, torch.float16)), torch.zeros(4, 4, 1, 8), ["torch.float32", "torch.float64"]),
        (dict(max_head_dim=4), torch.zeros(4, 4, 1, 8), ["head_dim", r"\b8\b", r"\b4\b"]),
    ],
    ids=["devices", "dtypes", "max_head_dim"],
)
def test_declared_fields_refuse_inputs_with_a_reason_naming_the_value(fields, x, names, registered):
    backend = registered(AttentionBackend("picky", sdpa_window_attention, **fields))
    reason = backend.supports(x, x, x)
    assert reason is not None
    for name in names:
        assert re.search(name, reason), (name, reason)
    # Forced, it does not run: the error names the backend, its reason and what can run instead.
    with pytest.raises(NotImplementedError) as err:
        hrperc.window_attention(x, x, x, (2, 2), backend="picky", **KW)
    msg = str(err.value)
    assert_names(msg, "'picky'", reason, "sdpa", "backend='auto'")


def test_declared_fields_accept_inputs_within_them_then_ask_check(registered):
    seen = []

    def check(q, k, v, **kw):
        seen.append(kw)
        return None

    fits = registered(
        AttentionBackend(
            "fits", sdpa_window_attention, devices=("cpu",), dtypes=(torch.float32,), max_head_dim=8, check=check
        )
    )
    q, k, v = _qkv()  # cpu, float32, head_dim 8: the boundary of max_head_dim is allowed
    assert fits.supports(q, k, v) is None and len(seen) == 1
    out = hrperc.window_attention(q, k, v, (2, 2), backend="fits", **KW)
    torch.testing.assert_close(out, hrperc.window_attention(q, k, v, (2, 2), backend="sdpa", **KW))
    # check= gets the normalised call; a field that refuses is decided before check= is asked.
    assert seen[-1]["grid"] == (2, 2) and seen[-1]["tile_size"] == (2, 2) and seen[-1]["window"] == "contiguous"
    n = len(seen)
    assert "torch.float64" in fits.supports(q.double())
    assert len(seen) == n


def test_auto_picks_by_priority_among_eligible_backends_that_support_the_inputs(registered, no_env):
    q, k, v = _qkv()
    calls = []
    resolve = A.resolve_backend
    registered(AttentionBackend("cpu_fast", _spy(calls), auto_devices=("cpu",), priority=5))
    registered(AttentionBackend("cpu_slow", sdpa_window_attention, auto_devices=None, priority=1))
    # Higher priorities that "auto" must pass over: refuses float32 / not automatic on CPU / only when forced.
    registered(
        AttentionBackend("f64_only", sdpa_window_attention, dtypes=(torch.float64,), auto_devices=("cpu",), priority=50)
    )
    registered(AttentionBackend("cuda_auto", sdpa_window_attention, auto_devices=("cuda",), priority=100))
    registered(AttentionBackend("forced_only", sdpa_window_attention, priority=1000))
    assert resolve("auto", q, k, v, **NORM).name == "cpu_fast"
    out = hrperc.window_attention(q, k, v, (2, 2), **KW)
    assert len(calls) == 1
    torch.testing.assert_close(out, hrperc.window_attention(q, k, v, (2, 2), backend="sdpa", **KW))
    # float64 inputs: the priority-50 backend supports them, so it wins.
    q64, k64, v64 = q.double(), k.double(), v.double()
    assert resolve("auto", q64, k64, v64, **NORM).name == "f64_only"
    # query_subset=True: only backends with a query-subset form compete.
    assert resolve("auto", q, k, v, query_subset=True, **NORM).name == "sdpa"
    registered(
        AttentionBackend(
            "subset_fast", sdpa_window_attention, query_subset=sdpa_query_subset, auto_devices=("cpu",), priority=3
        )
    )
    assert resolve("auto", q, k, v, query_subset=True, **NORM).name == "subset_fast"
    assert resolve("auto", q, k, v, **NORM).name == "cpu_fast"
    # Forcing still reaches a backend "auto" never picks.
    assert resolve("forced_only", q, k, v, **NORM).name == "forced_only"
    unregister_backend("cpu_fast")
    assert resolve("auto", q, k, v, **NORM).name == "subset_fast"
    for name in ("subset_fast", "cpu_slow", "f64_only", "cuda_auto", "forced_only"):
        unregister_backend(name)
    assert resolve("auto", q, k, v, **NORM).name == "sdpa"
    assert resolve("auto", q64, k64, v64, **NORM).name == "sdpa"
    hrperc.window_attention(q, k, v, (2, 2), **KW)
    assert len(calls) == 1  # the unregistered spy is not called again


def test_register_and_unregister_backends():
    mine = AttentionBackend("mine", sdpa_window_attention)
    assert register_backend(mine) is mine
    try:
        assert "mine" in available_backends() and get_backend("mine") is mine
        other = AttentionBackend("mine", reference_window_attention, reference_query_subset)
        with pytest.raises(ValueError) as err:
            register_backend(other)
        assert "'mine'" in str(err.value) and "replace=True" in str(err.value)
        assert get_backend("mine") is mine  # a refused registration changes nothing
        assert register_backend(other, replace=True) is other and get_backend("mine") is other
        assert available_backends().count("mine") == 1
    finally:
        unregister_backend("mine")
    assert "mine" not in available_backends()
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="'mine'"):
        hrperc.window_attention(q, k, v, (2, 2), backend="mine", **KW)
    with pytest.raises(ValueError, match="'mine'"):
        get_backend("mine")
    with pytest.raises(KeyError) as err:
        unregister_backend("mine")
    assert "'mine'" in str(err.value) and "'sdpa'" in str(err.value)  # the name, and what is registered
    with pytest.raises(TypeError) as err:
        register_backend(sdpa_window_attention)
    assert "function" in str(err.value) and "AttentionBackend" in str(err.value)
    with raises_naming(ValueError, "name='auto'"):
        AttentionBackend("auto", sdpa_window_attention)
    with raises_naming(TypeError, "'bad'", "fn", "NoneType"):
        AttentionBackend("bad", None)


def test_replace_a_builtin_and_restore_the_original(no_env):
    original = get_backend("sdpa")
    names = available_backends()
    calls = []
    q, k, v = _qkv()
    register_backend(dataclasses.replace(original, fn=_spy(calls)), replace=True)
    try:
        hrperc.window_attention(q, k, v, (2, 2), **KW)  # "auto" on CPU: the replacement
        assert len(calls) == 1 and available_backends() == names
    finally:
        register_backend(original, replace=True)
    assert get_backend("sdpa") is original and available_backends() == names
    hrperc.window_attention(q, k, v, (2, 2), **KW)
    assert len(calls) == 1


def test_attention_backend_nested_blocks_restore_the_outer_choice(no_env):
    q, k, v = _qkv()

    def chosen():
        return A.resolve_backend("auto", q, k, v, **NORM).name

    assert forced_backend() is None and chosen() == "sdpa"
    with hrperc.attention_backend("reference"):
        assert chosen() == "reference"
        with hrperc.attention_backend("sdpa"):
            assert chosen() == "sdpa"
            for unforce in (None, "auto"):
                with hrperc.attention_backend(unforce):
                    assert forced_backend() is None and chosen() == "sdpa"
                assert forced_backend() == "sdpa"
        assert chosen() == "reference"
        with pytest.raises(RuntimeError, match="boom"):
            with hrperc.attention_backend("sdpa"):
                raise RuntimeError("boom")
        assert chosen() == "reference"  # restored after an exception too
    assert forced_backend() is None and chosen() == "sdpa"


def test_attention_backend_choice_is_not_seen_by_another_thread(no_env):
    q, k, v = _qkv()
    log, errors = {}, []
    other_in, main_in = threading.Event(), threading.Event()

    def other():
        try:
            log["other before"] = forced_backend()
            with hrperc.attention_backend("sdpa"):
                log["other inside"] = forced_backend()
                other_in.set()
                assert main_in.wait(timeout=60)
                log["other while main forces"] = A.resolve_backend("auto", q, k, v, **NORM).name
            log["other after"] = forced_backend()
        except BaseException as exc:  # noqa: BLE001 -- reported by the main thread
            errors.append(exc)
        finally:
            other_in.set()

    with hrperc.attention_backend("reference"):
        thread = threading.Thread(target=other)
        thread.start()
        assert other_in.wait(timeout=60)
        log["main while other forces"] = forced_backend()
        main_in.set()
        thread.join(timeout=60)
        assert forced_backend() == "reference"
    assert not thread.is_alive() and not errors, errors
    assert log == {
        "other before": None,  # main's block is open, but not in this thread
        "other inside": "sdpa",
        "main while other forces": "reference",
        "other while main forces": "sdpa",
        "other after": None,
    }


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
    out = hrperc.attention.window_cross_attention(
        qf, qf, (2, 2), "contiguous", "contiguous", "contiguous", v_bias=b, **kw
    )
    q, k, v = (F.linear(qf, wi, bi).view(4, 4, h, d // h) for wi, bi in ((w[0], None), (w[1], None), (w[2], b)))
    att = _literal(q, k, v, (2, 2), (2, 2), "contiguous", "contiguous", "contiguous").reshape(1, 16, d)
    torch.testing.assert_close(out, F.linear(att, w[3]))
