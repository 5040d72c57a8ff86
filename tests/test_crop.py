"""Crops and their inverses: exact round trips, bijection, the paper's index formulas, permutations."""

from __future__ import annotations

import pytest
import torch
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
    window_permutation,
)

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
    stack_shape = {"nchw": (p["b"] * n, p["c"], h, w), "nhwc": (p["b"] * n, h, w, p["c"]),
                   "nlc": (p["b"] * n, h * w, p["c"])}[layout]
    t = torch.arange(torch.Size(stack_shape).numel()).reshape(stack_shape).to(
        p["dtype"] if p["dtype"] not in (torch.uint8,) else torch.int64)
    crop_fn, merge_fn = CROPS[p["kind"]]
    H, W = p["gh"] * h, p["gw"] * w
    ckw, mkw = _kw(layout, H, W, h, w)
    whole = merge_fn(t, (p["gh"], p["gw"]), layout=layout, **mkw)
    assert torch.equal(crop_fn(whole, (p["gh"], p["gw"]), layout=layout, **ckw), t)


@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 5), st.integers(1, 5), st.sampled_from(["contiguous",
                                                                                                       "strided"]))
def test_crop_is_a_bijection_on_pixels(gh, gw, h, w, kind):
    H, W = gh * h, gw * w
    x = torch.arange(2 * H * W).reshape(2, 1, H, W)
    tiles = CROPS[kind][0](x, (gh, gw))
    assert tiles.shape == (2 * gh * gw, 1, h, w)
    assert torch.equal(tiles.flatten().sort().values, torch.arange(2 * H * W))  # every pixel exactly once
    # and each image's pixels stay in that image's N sub-images
    assert torch.equal(tiles[: gh * gw].flatten().sort().values, torch.arange(H * W))


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


@given(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5), st.integers(1, 5), st.integers(1, 3),
       st.sampled_from([("contiguous", "strided"), ("strided", "contiguous"), ("strided", "strided")]))
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


def test_permute_windows_keeps_trailing_dims_and_noncontiguous_input():
    q = torch.randn(2 * 6, 4, 20, 3).transpose(1, 2)  # (B*N, T=20, heads=4, hd=3), non-contiguous
    got = permute_windows(q, (2, 3), "contiguous", "strided", tile_size=(4, 5))
    flat = q.reshape(12, 20, 12)
    ref = permute_windows(flat, (2, 3), "contiguous", "strided", tile_size=(4, 5)).reshape(12, 20, 4, 3)
    assert torch.equal(got, ref)


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


def test_compile_fullgraph_traces_crops_and_permutation():
    def roundtrip(x, t):
        a = stride_merge(stride_crop(x, (2, 3)), (2, 3))
        b = local_merge(local_crop(x, (2, 3)), (2, 3))
        c = permute_windows(t, (2, 3), "contiguous", "strided", tile_size=(2, 2))
        return a, b, c

    compiled = torch.compile(roundtrip, fullgraph=True, backend="eager")
    x, t = torch.randn(2, 3, 8, 9), torch.randn(12, 4, 5)
    a, b, c = compiled(x, t)
    assert torch.equal(a, x) and torch.equal(b, x)
    assert torch.equal(c, permute_windows(t, (2, 3), "contiguous", "strided", tile_size=(2, 2)))


def test_public_names_are_exported():
    for name in ["local_crop", "stride_crop", "local_merge", "stride_merge", "window_permutation",
                 "permute_windows", "LocalCrop", "StrideGlobalCrop", "Recombine", "DualPerspectiveCrop"]:
        assert name in hrperc.__all__ and hasattr(hrperc, name)


# -- errors -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: local_crop(torch.randn(3, 9, 9), (3, 3)), ValueError, ["x has shape (3, 9, 9)", "4 dims"]),
        (lambda: local_crop(torch.randn(2, 3, 1000, 1008), (3, 3)), ValueError,
         ["(2, 3, 1000, 1008)", "height 1000 is not divisible by grid height 3", "Resize or pad"]),
        (lambda: stride_crop(torch.randn(1, 3, 9, 10), (3, 3)), ValueError, ["width 10", "grid width 3"]),
        (lambda: local_crop(torch.randn(1, 3, 9, 9), (0, 3)), ValueError, ["grid=(0, 3)", ">= 1"]),
        (lambda: local_crop(torch.randn(1, 3, 9, 9), (1.5, 3)), TypeError, ["grid=(1.5, 3)", "integers"]),
        (lambda: local_crop(torch.randn(1, 3, 9, 9), "3x3"), TypeError, ["grid='3x3'"]),
        (lambda: local_merge(torch.randn(10, 3, 3, 3), (3, 3)), ValueError,
         ["(10, 3, 3, 3)", "multiple of N = gh*gw = 3*3 = 9"]),
        (lambda: local_merge(torch.randn(9, 30, 3), (3, 3), layout="nlc"), ValueError,
         ["30 is not a perfect square", "tile_size"]),
        (lambda: local_crop(torch.randn(1, 3, 9, 9), (3, 3), layout="nwhc"), ValueError, ["layout='nwhc'"]),
        (lambda: local_crop([[1.0]], (1, 1)), TypeError, ["torch.Tensor", "list"]),
        (lambda: permute_windows(torch.randn(5, 4, 2), (2, 2), "contiguous", "strided"), ValueError,
         ["(5, 4, 2)", "multiple of N"]),
        (lambda: permute_windows(torch.randn(4, 4, 2), (2, 2), "local", "strided"), ValueError,
         ["source='local'"]),
    ],
)
def test_errors_name_the_values_and_the_fix(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))
