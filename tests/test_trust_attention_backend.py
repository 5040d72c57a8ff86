"""A registered attention backend's result is checked after every call, never trusted.

A backend that returns the wrong shape (one that merely broadcasts included), the wrong dtype or
device, ``None``, a tuple or anything else is refused with an error naming the backend, what it
returned, what was expected and the fix; through :func:`hrperc.window_attention` (every output
order), :func:`hrperc.window_cross_attention`, :class:`hrperc.WindowCrossAttention` and each path of
the DEM (every token, footprint tokens only through the query-subset form, pooled), eager and
compiled. Correct backends, autocast included, run as before.
"""

from __future__ import annotations

import functools

import pytest
import torch
from _messages import FIX, raises_naming

import hrperc
from hrperc import DualPerspectiveEnhancement as DEM
from hrperc.attention import AttentionBackend, register_backend, unregister_backend, window_cross_attention
from hrperc.attention.dispatch import ENV_VAR
from hrperc.attention.reference import sdpa_query_subset, sdpa_window_attention

KW = dict(window="strided", q_order="contiguous", kv_order="strided")

# what a misbehaving backend returns instead of the right tensor ``o``: (make, exception, fragments of the message)
BAD = {
    "first image only (broadcasts)": (lambda o: o[:1], ValueError, []),
    "one token (broadcasts)": (lambda o: o[:, :1], ValueError, []),
    "one head (broadcasts)": (lambda o: o[:, :, :1], ValueError, []),
    "heads and tokens swapped": (lambda o: o.transpose(1, 2), ValueError, []),
    "heads merged": (lambda o: o.flatten(-2), ValueError, []),
    "float64": (lambda o: o.double(), TypeError, ["torch.float64"]),
    "float16": (lambda o: o.half(), TypeError, ["torch.float16"]),
    "int32": (lambda o: o.int(), TypeError, ["torch.int32"]),
    "meta device": (lambda o: torch.empty_like(o, device="meta"), TypeError, ["on meta"]),
    "None": (lambda o: None, TypeError, ["returned None"]),
    "tuple with weights": (lambda o: (o, None), TypeError, ["tuple of 2 (Tensor, NoneType)"]),
    "list": (lambda o: [o], TypeError, ["list of 1 (Tensor)"]),
    "numpy array": (lambda o: o.detach().numpy(), TypeError, ["ndarray"]),
}


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.fixture
def backend():
    """``backend(name, make_fn=None, make_subset=None)`` registers a backend whose whole-window result (and
    query-subset result, if given) SDPA's turned by ``make_*``; every one is unregistered afterwards."""
    names = []

    def add(name, make_fn=None, make_subset=None, subset=True):
        def fn(q, k, v, grid, **kw):
            out = sdpa_window_attention(q, k, v, grid, **kw)
            return out if make_fn is None else make_fn(out)

        def query_subset(q, k, v, *, scale):
            out = sdpa_query_subset(q, k, v, scale=scale)
            return out if make_subset is None else make_subset(out)

        register_backend(AttentionBackend(name, fn, query_subset if subset else None))
        names.append(name)
        return name

    yield add
    for name in names:
        unregister_backend(name)


def _expect(name, form, got_shape, exc, fragments, expected_shape):
    """What the error must name: the backend, the form, what it returned, what was expected, the fix."""
    got = [f"shape {tuple(got_shape)}"] if exc is ValueError else fragments
    return raises_naming(exc, f"'{name}'", form, *got, f"shape {tuple(expected_shape)}", "backend='auto'", FIX)


# --- the functional API and the module --------------------------------------------------------------------
@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("out_order", ["contiguous", "strided", "map"])
def test_window_attention_refuses_what_a_backend_returns_wrongly(backend, case, out_order):
    make, exc, fragments = BAD[case]
    torch.manual_seed(0)
    q, k, v = (torch.randn(2 * 4, 9, 2, 8) for _ in range(3))  # B=2, grid 2x2, 3x3 tiles, 2 heads of 8
    ref = hrperc.window_attention(q, k, v, (2, 2), out_order=out_order, backend="sdpa", **KW)
    name = backend("bad", make_fn=make)
    with _expect(name, "fn", make(ref).shape if exc is ValueError else None, exc, fragments, ref.shape):
        hrperc.window_attention(q, k, v, (2, 2), out_order=out_order, backend=name, **KW)
    with _expect(name, "fn", make(ref).shape if exc is ValueError else None, exc, fragments, ref.shape):
        with hrperc.attention_backend(name):  # forced by the context, not the argument
            hrperc.window_attention(q, k, v, (2, 2), out_order=out_order, **KW)


@pytest.mark.parametrize("case", ["first image only (broadcasts)", "one token (broadcasts)", "float64", "None"])
def test_window_cross_attention_and_its_module_refuse_a_wrong_result(backend, case):
    make, exc, fragments = BAD[case]
    torch.manual_seed(0)
    d, heads = 16, 2
    x, y = torch.randn(2 * 4, 9, d), torch.randn(2 * 4, 9, d)
    w = [torch.randn(d, d) * d**-0.5 for _ in range(4)]
    attn = hrperc.WindowCrossAttention(d, heads)
    name = backend(f"bad_{case}", make_fn=make)
    calls = {
        "functional": lambda b: window_cross_attention(
            x,
            y,
            (2, 2),
            "strided",
            "contiguous",
            "strided",
            q_weight=w[0],
            k_weight=w[1],
            v_weight=w[2],
            out_weight=w[3],
            heads=heads,
            backend=b,
        ),
        "module": lambda b: attn(x, y, (2, 2), backend=b, **KW),
        "module.attend": lambda b: attn.attend(x, y, (2, 2), backend=b, out_order="contiguous", **KW),
    }
    for label, call in calls.items():
        ref = hrperc.window_attention(
            *(torch.zeros(8, 9, heads, d // heads),) * 3,
            (2, 2),
            backend="sdpa",
            out_order="contiguous" if label == "module.attend" else "map",
            **KW,
        )  # the shape the backend must return
        with _expect(name, "fn", make(ref).shape if exc is ValueError else None, exc, fragments, ref.shape):
            call(name)


# --- the DEM, on each of its paths ------------------------------------------------------------------------
def _dem_inputs(cfg, b=2):
    torch.manual_seed(0)
    dem = DEM(32, 2, **cfg)
    for p in dem.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return dem, torch.randn(b * 9, 16, 32), torch.randn(b * 9, 16, 32)


DEM_PATHS = {  # config -> the form of the backend that path calls
    "every token": (dict(skip_unread=False), "fn"),
    "footprint (query subset)": (dict(), "query_subset"),
    "pooled": (dict(residual_norm=False, fusion="add", reduction="avg"), "fn"),
    "footprint, backend without a subset form": (dict(), "fn"),
}


@functools.cache
def _expected_shape(path) -> tuple[int, ...]:
    """The shape the backend's form must return on ``path``, recorded from a correct backend (its first call)."""
    cfg, _ = DEM_PATHS[path]
    dem, loc, glo = _dem_inputs(cfg)
    shapes = []
    record = lambda o: shapes.append(tuple(o.shape)) or o  # noqa: E731
    subset = record if path != "footprint, backend without a subset form" else None
    register_backend(
        AttentionBackend(
            "recorder",
            lambda *a, **kw: record(sdpa_window_attention(*a, **kw)),
            subset and (lambda *a, **kw: record(sdpa_query_subset(*a, **kw))),
        )
    )
    try:
        dem(loc, glo, (3, 3), backend="recorder")
    finally:
        unregister_backend("recorder")
    return shapes[0]


@pytest.mark.parametrize("path", list(DEM_PATHS))
@pytest.mark.parametrize("case", list(BAD))
def test_the_dem_refuses_a_wrong_backend_result_on_every_path(backend, path, case):
    cfg, form = DEM_PATHS[path]
    make, exc, fragments = BAD[case]
    dem, loc, glo = _dem_inputs(cfg)
    bad = {"make_fn": make} if form == "fn" else {"make_subset": make}
    name = backend("bad", subset=path != "footprint, backend without a subset form", **bad)
    expected = _expected_shape(path)
    got = make(torch.zeros(expected)).shape if exc is ValueError else None
    with _expect(name, form, got, exc, fragments, expected) as info:
        dem(loc, glo, (3, 3), backend=name)
    assert "DualPerspectiveEnhancement" in str(info.value) or "window_attention" in str(info.value)


@pytest.mark.parametrize("path", list(DEM_PATHS))
def test_a_correct_registered_backend_gives_the_built_in_result_on_every_path(backend, path):
    cfg, _ = DEM_PATHS[path]
    dem, loc, glo = _dem_inputs(cfg)
    good = backend("good", subset=path != "footprint, backend without a subset form")
    torch.testing.assert_close(dem(loc, glo, (3, 3), backend=good), dem(loc, glo, (3, 3)), rtol=1e-5, atol=1e-5)


def test_a_broadcastable_result_no_longer_passes_silently_into_the_dem(backend):
    """The example: (B, 1, heads, head_dim) broadcast over every token gave a normal-looking DEM output."""
    dem, loc, glo = _dem_inputs(dict(skip_unread=False))
    name = backend("one_token", make_fn=lambda o: o[:, :1])
    with raises_naming(ValueError, "'one_token'", "(2, 1, 2, 16)", "(2, 144, 2, 16)", "(B, Ht*Wt, heads, head_dim)"):
        dem(loc, glo, (3, 3), backend=name)


# --- autocast and torch.compile ---------------------------------------------------------------------------
def test_under_autocast_the_autocast_dtype_is_accepted_and_others_refused(backend):
    torch.manual_seed(0)
    q, k, v = (torch.randn(8, 9, 2, 8) for _ in range(3))  # float32 inputs, bfloat16 autocast
    as_fp32 = backend("as_fp32", make_fn=lambda o: o.float())
    as_fp16 = backend("as_fp16", make_fn=lambda o: o.half())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for name, dtype in (("sdpa", torch.bfloat16), ("reference", torch.bfloat16), (as_fp32, torch.float32)):
            assert hrperc.window_attention(q, k, v, (2, 2), backend=name, **KW).dtype == dtype
        with raises_naming(TypeError, "'as_fp16'", "torch.float16", "torch.float32", "torch.bfloat16", FIX):
            hrperc.window_attention(q, k, v, (2, 2), backend=as_fp16, **KW)
        dem, loc, glo = _dem_inputs(dict())
        torch.testing.assert_close(dem(loc, glo, (3, 3), backend=backend("good")), dem(loc, glo, (3, 3)))


def test_compiled_calls_run_correct_backends_and_refuse_wrong_ones(backend):
    """(The compiled DEM, whose every attention call is checked the same way, is in test_dem.py.)"""
    good = backend("good")
    bad = backend("bad", make_fn=lambda o: o[:, :1])
    torch.manual_seed(0)
    q, k, v = (torch.randn(8, 9, 2, 8) for _ in range(3))

    def attend(q, k, v, name):
        return hrperc.window_attention(q, k, v, (2, 2), out_order="map", backend=name, **KW)

    torch._dynamo.reset()
    got = torch.compile(attend, fullgraph=True, backend="eager")(q, k, v, good)  # no graph break
    torch.testing.assert_close(got, attend(q, k, v, "sdpa"))
    torch._dynamo.reset()
    with raises_naming(ValueError, "'bad'", "(2, 1, 2, 8)", "(2, 36, 2, 8)", "backend='auto'"):
        torch.compile(attend, backend="eager")(q, k, v, bad)
    torch._dynamo.reset()
    with pytest.raises(Exception) as info:  # fullgraph: dynamo reports the error it traced
        torch.compile(attend, fullgraph=True, backend="eager")(q, k, v, bad)
    assert "'bad'" in str(info.value)
    torch._dynamo.reset()
