"""Crops and their inverses: exact round trips, bijection, the paper's index formulas, permutations."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from _messages import FIX, assert_names, raises_naming
from hypothesis import given
from hypothesis import strategies as st

import hrperc
from hrperc import (
    LocalCrop,
    Recombine,
    StrideGlobalCrop,
    local_crop,
    local_merge,
    permute_windows,
    stride_crop,
    stride_merge,
)
from hrperc.ops import window_permutation

LAYOUTS = ["nchw", "nhwc", "nlc"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.int32]
CROPS = {"contiguous": (local_crop, local_merge), "strided": (stride_crop, stride_merge)}


def _map(layout, b, c, H, W, dtype):
    """An input whose every element is distinct (within dtype range), so any index mix-up is visible."""
    shape = {"nchw": (b, c, H, W), "nhwc": (b, H, W, c), "nlc": (b, H * W, c)}[layout]
    n = b * c * H * W
    x = torch.arange(n, dtype=torch.int64).reshape(shape)
    if dtype == torch.uint8:
        return (x % 251).to(dtype)
    if dtype in (torch.float16, torch.bfloat16):
        return torch.randn(shape).to(dtype)
    return x.to(dtype)


def _kw(layout, H, W, h, w):
    return ({"size": (H, W)}, {"tile_size": (h, w)}) if layout == "nlc" else ({}, {})


case = st.fixed_dictionaries(
    {
        "gh": st.integers(1, 8),
        "gw": st.integers(1, 8),
        "h": st.integers(1, 5),
        "w": st.integers(1, 5),
        "b": st.integers(1, 3),
        "c": st.integers(1, 4),
        "dtype": st.sampled_from(DTYPES),
        "layout": st.sampled_from(["nchw", "nhwc", "nlc"]),
        "kind": st.sampled_from(["contiguous", "strided"]),
        "transpose": st.booleans(),
    }
)


@given(case)
def test_merge_of_crop_is_identity(p):
    H, W = p["gh"] * p["h"], p["gw"] * p["w"]
    x = _map(p["layout"], p["b"], p["c"], H, W, p["dtype"])
    if p["transpose"] and p["layout"] != "nlc":  # a non-contiguous view with the same logical content
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    crop_fn, merge_fn = CROPS[p["kind"]]
    ckw, mkw = _kw(p["layout"], H, W, p["h"], p["w"])
    tiles = crop_fn(x, (p["gh"], p["gw"]), layout=p["layout"], **ckw)
    n = p["gh"] * p["gw"]
    assert tiles.shape[0] == p["b"] * n
    assert tiles.dtype == x.dtype
    assert torch.equal(merge_fn(tiles, (p["gh"], p["gw"]), layout=p["layout"], **mkw), x)


@given(case)
def test_crop_of_merge_is_identity(p):
    n = p["gh"] * p["gw"]
    h, w = p["h"], p["w"]
    layout = p["layout"]
    stack_shape = {
        "nchw": (p["b"] * n, p["c"], h, w),
        "nhwc": (p["b"] * n, h, w, p["c"]),
        "nlc": (p["b"] * n, h * w, p["c"]),
    }[layout]
    t = (
        torch.arange(torch.Size(stack_shape).numel())
        .reshape(stack_shape)
        .to(p["dtype"] if p["dtype"] not in (torch.uint8,) else torch.int64)
    )
    crop_fn, merge_fn = CROPS[p["kind"]]
    H, W = p["gh"] * h, p["gw"] * w
    ckw, mkw = _kw(layout, H, W, h, w)
    whole = merge_fn(t, (p["gh"], p["gw"]), layout=layout, **mkw)
    assert torch.equal(crop_fn(whole, (p["gh"], p["gw"]), layout=layout, **ckw), t)


@given(
    st.integers(1, 6),
    st.integers(1, 6),
    st.integers(1, 5),
    st.integers(1, 5),
    st.integers(1, 3),
    st.sampled_from(["contiguous", "strided"]),
    st.sampled_from(LAYOUTS),
)
def test_crop_is_a_bijection_on_pixels(gh, gw, h, w, c, kind, layout):
    H, W, n = gh * h, gw * w, gh * gw
    x = _map(layout, 2, c, H, W, torch.int64)  # arange: every element distinct
    ckw, mkw = _kw(layout, H, W, h, w)
    tiles = CROPS[kind][0](x, (gh, gw), layout=layout, **ckw)
    expected = {"nchw": (2 * n, c, h, w), "nhwc": (2 * n, h, w, c), "nlc": (2 * n, h * w, c)}[layout]
    assert tiles.shape == expected
    assert torch.equal(tiles.flatten().sort().values, torch.arange(2 * H * W * c))  # every element exactly once
    # and each image's elements stay in that image's N sub-images
    assert torch.equal(tiles[:n].flatten().sort().values, torch.arange(H * W * c))
    # the merge is a bijection back: every element exactly once, each in its original place
    assert torch.equal(CROPS[kind][1](tiles, (gh, gw), layout=layout, **mkw), x)


@given(st.integers(1, 5), st.integers(1, 5), st.integers(1, 4), st.integers(1, 4), st.integers(1, 2))
def test_local_crop_matches_eq_13_index_by_index(gh, gw, h, w, b):
    x = torch.randn(b, 2, gh * h, gw * w)
    tiles = local_crop(x, (gh, gw))
    n = gh * gw
    for bb in range(b):
        for k in range(n):
            row, col = k // gw, k % gw  # eq. 11-12
            assert torch.equal(tiles[bb * n + k], x[bb, :, row * h : (row + 1) * h, col * w : (col + 1) * w])


@given(st.integers(1, 5), st.integers(1, 5), st.integers(1, 4), st.integers(1, 4), st.integers(1, 2))
def test_stride_crop_matches_eq_17_index_by_index(gh, gw, h, w, b):
    x = torch.randn(b, 2, gh * h, gw * w)
    tiles = stride_crop(x, (gh, gw))
    n = gh * gw
    for bb in range(b):
        for k in range(n):
            i, j = k // gw, k % gw
            for r in range(h):
                for c in range(w):
                    assert torch.equal(tiles[bb * n + k, :, r, c], x[bb, :, i + r * gh, j + c * gw])


def test_documented_examples():
    x = torch.arange(24).reshape(1, 1, 4, 6)
    assert local_crop(x, (2, 3))[4, 0].tolist() == [[14, 15], [20, 21]]
    assert stride_crop(x, (2, 3))[4, 0].tolist() == [[7, 10], [19, 22]]


def test_layouts_agree_with_each_other():
    x = torch.randn(2, 5, 6, 12)  # (B, C, H, W)
    nhwc = x.permute(0, 2, 3, 1)
    nlc = nhwc.reshape(2, 72, 5)
    for kind, (crop_fn, _) in CROPS.items():
        a = crop_fn(x, (3, 4))
        b = crop_fn(nhwc, (3, 4), layout="nhwc")
        c = crop_fn(nlc, (3, 4), layout="nlc", size=(6, 12))
        assert torch.equal(a.permute(0, 2, 3, 1), b), kind
        assert torch.equal(b.reshape(b.shape[0], -1, 5), c), kind


@given(
    st.integers(1, 5),
    st.integers(1, 5),
    st.integers(1, 5),
    st.integers(1, 5),
    st.integers(1, 3),
    st.sampled_from([("contiguous", "strided"), ("strided", "contiguous"), ("strided", "strided")]),
)
def test_permutation_equals_merge_then_crop(gh, gw, th, tw, b, kinds):
    source, target = kinds
    grid, n = (gh, gw), gh * gw
    tokens = torch.randn(b * n, th * tw, 3)
    whole = CROPS[source][1](tokens, grid, layout="nlc", tile_size=(th, tw))
    expected = CROPS[target][0](whole, grid, layout="nlc", size=(gh * th, gw * tw))
    got = permute_windows(tokens, grid, source, target, tile_size=(th, tw))
    assert torch.equal(got, expected)
    perm = window_permutation(grid, (th, tw), source, target)
    assert torch.equal(perm.sort().values, torch.arange(n * th * tw))  # a permutation
    inv = window_permutation(grid, (th, tw), target, source)
    assert torch.equal(perm[inv], torch.arange(n * th * tw))  # and the reverse one is its inverse


def test_window_permutation_cannot_be_corrupted_through_the_cache():
    args = ((2, 3), (4, 5), "contiguous", "strided")
    good = window_permutation(*args).clone()
    tokens = torch.randn(6, 20, 3)
    expected = permute_windows(tokens, (2, 3), "contiguous", "strided", tile_size=(4, 5))
    first = window_permutation(*args)
    first.zero_()  # a caller scribbles on its copy
    assert torch.equal(window_permutation(*args), good)
    assert window_permutation(*args) is not window_permutation(*args)
    assert torch.equal(permute_windows(tokens, (2, 3), "contiguous", "strided", tile_size=(4, 5)), expected)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["contiguous", "strided"])
def test_noncontiguous_inputs_to_crops_and_merges(layout, kind):
    gh, gw, h, w, c = 2, 3, 3, 2, 4
    H, W, n = gh * h, gw * w, gh * gw
    crop_fn, merge_fn = CROPS[kind]
    ckw, mkw = _kw(layout, H, W, h, w)
    x = _map(layout, 2, c, H, W, torch.float32)
    x_nc = torch.stack([x, -x], -1)[..., 0]  # same values, non-contiguous (last dim strided by 2)
    assert not x_nc.is_contiguous() and torch.equal(x_nc, x)
    tiles = crop_fn(x, (gh, gw), layout=layout, **ckw)
    assert torch.equal(crop_fn(x_nc, (gh, gw), layout=layout, **ckw), tiles)
    # merges of non-contiguous stacks: a transposed-back copy and a strided slice
    t_nc = tiles.transpose(1, 2).contiguous().transpose(1, 2)
    t_sl = torch.stack([tiles, -tiles], 1).flatten(0, 1)[::2]
    for t in (t_nc, t_sl):
        assert not t.is_contiguous() and torch.equal(t, tiles)
        assert torch.equal(merge_fn(t, (gh, gw), layout=layout, **mkw), x)
    assert tiles.shape[0] == 2 * n


def test_permute_windows_keeps_trailing_dims_and_noncontiguous_input():
    q = torch.randn(2 * 6, 4, 20, 3).transpose(1, 2)  # (B*N, T=20, heads=4, hd=3), non-contiguous
    got = permute_windows(q, (2, 3), "contiguous", "strided", tile_size=(4, 5))
    flat = q.reshape(12, 20, 12)
    ref = permute_windows(flat, (2, 3), "contiguous", "strided", tile_size=(4, 5)).reshape(12, 20, 4, 3)
    assert torch.equal(got, ref)


def test_modules_take_the_nlc_size_argument():
    x = torch.randn(2, 6 * 9, 4)
    ref = local_crop(x, (2, 3), layout="nlc", size=(6, 9))
    assert torch.equal(LocalCrop((2, 3), layout="nlc", size=(6, 9))(x), ref)
    assert torch.equal(LocalCrop((2, 3), layout="nlc")(x, size=(6, 9)), ref)
    assert torch.equal(
        StrideGlobalCrop((2, 3), layout="nlc", size=(6, 9))(x), stride_crop(x, (2, 3), layout="nlc", size=(6, 9))
    )
    tokens = torch.randn(6, 12, 4)
    rec = Recombine((2, 3), "strided", tile_size=(3, 4))
    assert rec(tokens).shape == (1, 6, 12, 4) and rec.tile_size == (3, 4)
    assert torch.equal(rec(tokens).reshape(1, 72, 4), stride_merge(tokens, (2, 3), layout="nlc", tile_size=(3, 4)))
    assert "size=(6, 9)" in repr(LocalCrop((2, 3), layout="nlc", size=(6, 9)))


def test_modules_forward_to_functions():
    x = torch.randn(2, 3, 12, 9)
    assert torch.equal(LocalCrop((3, 3))(x), local_crop(x, (3, 3)))
    assert torch.equal(StrideGlobalCrop((2, 3))(x), stride_crop(x, (2, 3)))
    tokens = torch.randn(2 * 6, 20, 8)
    rec = Recombine((2, 3), "strided")(tokens, tile_size=(4, 5))
    assert rec.shape == (2, 8, 15, 8)
    assert torch.equal(rec.reshape(2, 120, 8), stride_merge(tokens, (2, 3), layout="nlc", tile_size=(4, 5)))
    assert "grid=(3, 3)" in repr(LocalCrop((3, 3)))


def test_crop_returns_a_view_when_possible():
    x = torch.randn(2, 3, 8, 8)
    assert local_crop(x, (1, 1)).data_ptr() == x.data_ptr()  # grid 1x1 is a pure view
    tokens = torch.randn(4, 16, 8)
    assert permute_windows(tokens, (2, 2), "strided", "strided") is tokens


_COMPILE_MAP = {"nchw": (2, 3, 8, 9), "nhwc": (2, 8, 9, 3), "nlc": (2, 72, 3)}
_COMPILE_STACK = {"nchw": (12, 3, 4, 3), "nhwc": (12, 4, 3, 3), "nlc": (12, 12, 3)}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("module", ["LocalCrop", "StrideGlobalCrop", "Recombine-contiguous", "Recombine-strided"])
def test_compile_fullgraph_aot_eager_modules(layout, module):
    torch._dynamo.reset()
    nlc = layout == "nlc"
    if module.startswith("Recombine"):
        m = Recombine((2, 3), module.split("-")[1], layout=layout, tile_size=(4, 3) if nlc else None)
        x = torch.randn(_COMPILE_STACK[layout])
    else:
        m = {"LocalCrop": LocalCrop, "StrideGlobalCrop": StrideGlobalCrop}[module](
            (2, 3), layout=layout, size=(8, 9) if nlc else None
        )
        x = torch.randn(_COMPILE_MAP[layout])
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    got, ref = compiled(x), m(x)
    assert got.shape == ref.shape and torch.equal(got, ref)


def test_compile_fullgraph_traces_crops_and_permutation():
    def roundtrip(x, t):
        a = stride_merge(stride_crop(x, (2, 3)), (2, 3))
        b = local_merge(local_crop(x, (2, 3)), (2, 3))
        c = permute_windows(t, (2, 3), "contiguous", "strided", tile_size=(2, 2))
        return a, b, c

    torch._dynamo.reset()
    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    x, t = torch.randn(2, 3, 8, 9), torch.randn(12, 4, 5)
    a, b, c = compiled(x, t)
    assert torch.equal(a, x) and torch.equal(b, x)
    assert torch.equal(c, permute_windows(t, (2, 3), "contiguous", "strided", tile_size=(2, 2)))


def test_public_names_are_exported():
    for name in [
        "local_crop",
        "stride_crop",
        "local_merge",
        "stride_merge",
        "permute_windows",
        "LocalCrop",
        "StrideGlobalCrop",
        "Recombine",
        "DualPerspectiveCrop",
    ]:
        assert name in hrperc.__all__ and hasattr(hrperc, name)
    for name in ["crop", "merge", "window_permutation", "local_crop", "permute_windows"]:
        assert name in hrperc.ops.__all__ and hasattr(hrperc.ops, name)


# -- errors -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: local_crop(torch.randn(3, 9, 9), (3, 3)), ValueError, ["x has shape (3, 9, 9)", "4 dims"]),
        (
            lambda: local_crop(torch.randn(2, 3, 1000, 1008), (3, 3)),
            ValueError,
            ["(2, 3, 1000, 1008)", "height 1000", "grid height 3"],
        ),
        (lambda: stride_crop(torch.randn(1, 3, 9, 10), (3, 3)), ValueError, ["width 10", "grid width 3"]),
        (lambda: local_crop(torch.randn(1, 3, 9, 9), (0, 3)), ValueError, ["grid=(0, 3)", ">= 1"]),
        (lambda: local_crop(torch.randn(1, 3, 9, 9), (1.5, 3)), TypeError, ["grid=(1.5, 3)", "float", "grid=(3, 3)"]),
        (lambda: local_crop(torch.randn(1, 3, 9, 9), "3x3"), TypeError, ["grid='3x3'"]),
        (lambda: local_merge(torch.randn(10, 3, 3, 3), (3, 3)), ValueError, ["(10, 3, 3, 3)", "N = gh*gw = 3*3 = 9"]),
        (
            lambda: local_merge(torch.randn(9, 30, 3), (3, 3), layout="nlc"),
            ValueError,
            ["(9, 30, 3)", "30", "tile_size=(rows, cols)"],
        ),
        (
            lambda: local_crop(torch.randn(1, 3, 9, 9), (3, 3), layout="nwhc"),
            ValueError,
            ["layout='nwhc'", "('nchw', 'nhwc', 'nlc')"],
        ),
        (lambda: local_crop([[1.0]], (1, 1)), TypeError, ["torch.Tensor", "list"]),
        (
            lambda: permute_windows(torch.randn(5, 4, 2), (2, 2), "contiguous", "strided"),
            ValueError,
            ["(5, 4, 2)", "N = gh*gw = 2*2 = 4"],
        ),
        (
            lambda: permute_windows(torch.randn(4, 4, 2), (2, 2), "local", "strided"),
            ValueError,
            ["source='local'", "'contiguous'", "'strided'"],
        ),
        (
            lambda: hrperc.ops.crop(torch.randn(1, 3, 9, 9), (3, 3), "tiles"),
            ValueError,
            ["kind='tiles'", "'contiguous'", "'strided'"],
        ),
        (
            lambda: window_permutation((2, 2), (2, 2), "contiguous", "diagonal"),
            ValueError,
            ["target='diagonal'", "'contiguous'", "'strided'"],
        ),
        (lambda: Recombine((2, 2), "interleaved"), ValueError, ["kind='interleaved'", "'contiguous'", "'strided'"]),
        # first dimension not a multiple of N: every merge and layout
        (
            lambda: stride_merge(torch.randn(10, 3, 3, 3), (3, 3)),
            ValueError,
            ["stride_merge", "(10, 3, 3, 3)", "N = gh*gw = 3*3 = 9", "grid"],
        ),
        (
            lambda: local_merge(torch.randn(7, 3, 3, 2), (2, 3), layout="nhwc"),
            ValueError,
            ["(7, 3, 3, 2)", "N = gh*gw = 2*3 = 6"],
        ),
        (
            lambda: stride_merge(torch.randn(5, 4, 8), (2, 2), layout="nlc"),
            ValueError,
            ["(5, 4, 8)", "N = gh*gw = 2*2 = 4"],
        ),
        (
            lambda: local_merge(torch.randn(8, 9, 8), (2, 2), layout="nlc", tile_size=(2, 4)),
            ValueError,
            ["tile_size=(2, 4)", "8", "9 tokens", "(8, 9, 8)"],
        ),
        (
            lambda: local_crop(torch.randn(1, 20, 8), (2, 2), layout="nlc"),
            ValueError,
            ["(1, 20, 8)", "20", "size=(rows, cols)"],
        ),
        # permute_windows: wrong types and shapes
        (
            lambda: permute_windows([[1.0]], (1, 1), "contiguous", "strided"),
            TypeError,
            ["tokens", "list", "torch.Tensor", "torch.as_tensor(tokens)"],
        ),
        (
            lambda: permute_windows(torch.randn(4), (2, 2), "contiguous", "strided"),
            ValueError,
            ["tokens has shape (4,)", "1 dims", "2 dims", "reshape"],
        ),
        (
            lambda: permute_windows(torch.randn(4, 6, 2), (2, 2), "contiguous", "strided", tile_size=(2, 2)),
            ValueError,
            ["(4, 6, 2)", "6 tokens", "tile_size=(2, 2)"],
        ),
        # size=/tile_size= belong to layout='nlc' only
        (
            lambda: local_crop(torch.randn(1, 3, 9, 9), (3, 3), size=(9, 9)),
            ValueError,
            ["size=(9, 9)", "layout='nchw'", "layout='nlc'", "Drop size="],
        ),
        (
            lambda: stride_crop(torch.randn(1, 9, 9, 3), (3, 3), layout="nhwc", size=(9, 9)),
            ValueError,
            ["size=(9, 9)", "layout='nhwc'", "layout='nlc'"],
        ),
        (
            lambda: local_merge(torch.randn(9, 3, 3, 3), (3, 3), tile_size=(3, 3)),
            ValueError,
            ["tile_size=(3, 3)", "layout='nchw'", "layout='nlc'", "Drop tile_size="],
        ),
        (
            lambda: stride_merge(torch.randn(9, 3, 3, 3), (3, 3), layout="nhwc", tile_size=(3, 3)),
            ValueError,
            ["tile_size=(3, 3)", "layout='nhwc'", "layout='nlc'"],
        ),
        (lambda: LocalCrop((3, 3), size=(9, 9)), ValueError, ["LocalCrop", "size=(9, 9)", "layout='nlc'"]),
        (
            lambda: Recombine((3, 3), layout="nchw", tile_size=(3, 3)),
            ValueError,
            ["Recombine", "tile_size=(3, 3)", "layout='nlc'"],
        ),
    ],
)
def test_errors_name_the_values_and_the_fix(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    assert_names(msg, *words)
    assert FIX.search(msg), f"no fix in: {msg}"


# -- zero sizes: refused with the argument, the shape, the rule and the fix --------------------------------
_ZERO_MAPS = {
    "nchw": [
        ((0, 3, 9, 9), "batch size B"),
        ((1, 0, 9, 9), "channel count C"),
        ((1, 3, 0, 9), "height H"),
        ((1, 3, 9, 0), "width W"),
    ],
    "nhwc": [
        ((0, 9, 9, 3), "batch size B"),
        ((1, 0, 9, 3), "height H"),
        ((1, 9, 0, 3), "width W"),
        ((1, 9, 9, 0), "channel count C"),
    ],
    "nlc": [((0, 81, 3), "batch size B"), ((1, 0, 3), "token count H*W"), ((1, 81, 0), "channel count C")],
}
_ZERO_STACKS = {
    "nchw": [
        ((0, 3, 3, 3), "first dimension B*N"),
        ((9, 0, 3, 3), "channel count C"),
        ((9, 3, 0, 3), "height h"),
        ((9, 3, 3, 0), "width w"),
    ],
    "nhwc": [
        ((0, 3, 3, 3), "first dimension B*N"),
        ((9, 0, 3, 3), "height h"),
        ((9, 3, 0, 3), "width w"),
        ((9, 3, 3, 0), "channel count C"),
    ],
    "nlc": [((0, 9, 3), "first dimension B*N"), ((9, 0, 3), "token count h*w"), ((9, 9, 0), "channel count C")],
}


@pytest.mark.parametrize("kind", ["contiguous", "strided"])
@pytest.mark.parametrize("layout, shape, what", [(lay, s, w) for lay, cases in _ZERO_MAPS.items() for s, w in cases])
def test_crop_refuses_zero_sizes(kind, layout, shape, what):
    fn = CROPS[kind][0]
    with pytest.raises(ValueError) as info:
        fn(torch.zeros(shape), (3, 3), layout=layout)
    msg = str(info.value)
    assert_names(msg, fn.__name__, f"x has shape {shape}", what, f"dim {shape.index(0)}", ">= 1")
    assert FIX.search(msg), f"no fix in: {msg}"


@pytest.mark.parametrize("kind", ["contiguous", "strided"])
@pytest.mark.parametrize("layout, shape, what", [(lay, s, w) for lay, cases in _ZERO_STACKS.items() for s, w in cases])
def test_merge_refuses_zero_sizes(kind, layout, shape, what):
    fn = CROPS[kind][1]
    with pytest.raises(ValueError) as info:
        fn(torch.zeros(shape), (3, 3), layout=layout)
    msg = str(info.value)
    assert_names(msg, fn.__name__, f"tiles has shape {shape}", what, f"dim {shape.index(0)}", ">= 1")
    assert FIX.search(msg), f"no fix in: {msg}"


def test_zero_sizes_refused_by_the_documented_examples_and_permute_windows():
    with raises_naming(ValueError, "x has shape (0, 3, 9, 9)", "batch size B", "dim 0") as info:
        local_crop(torch.zeros(0, 3, 9, 9), (3, 3))
    assert FIX.search(str(info.value))
    # zero tokens with an explicit size is refused too, before any arithmetic
    with raises_naming(ValueError, "x has shape (2, 0, 4)", "token count H*W", "dim 1"):
        stride_crop(torch.zeros(2, 0, 4), (1, 1), layout="nlc", size=(1, 1))
    with raises_naming(ValueError, "tokens has shape (4, 0, 8)", "dim 1") as info:
        permute_windows(torch.zeros(4, 0, 8), (2, 2), "contiguous", "strided")
    assert FIX.search(str(info.value))
    with raises_naming(ValueError, "tokens has shape (4, 4, 0)", "trailing dimension", "dim 2"):
        permute_windows(torch.zeros(4, 4, 0), (2, 2), "contiguous", "strided")


def test_permutation_first_built_in_inference_mode_still_trains():
    # The first call of a process under inference_mode must not leave behind (cache) an inference tensor
    # that autograd later saves. A fresh interpreter makes that call the first for these shapes.
    code = (
        "import torch\n"
        "from hrperc import permute_windows\n"
        "grid, tile = (2, 3), (3, 2)\n"
        "x = torch.randn(6, 6, 4)\n"
        "with torch.inference_mode():\n"
        "    permute_windows(x, grid, 'contiguous', 'strided', tile_size=tile)\n"
        "xg = x.clone().requires_grad_(True)\n"
        "y = permute_windows(xg, grid, 'contiguous', 'strided', tile_size=tile)\n"
        "y.square().sum().backward()\n"
        "assert torch.equal(xg.grad, 2 * x)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
