"""Window geometry (hrperc.ops.geometry): the index maths, its agreement with the crops, the checks.

The index functions are checked exhaustively on small grids and tiles (every window, every token,
every map position, both kinds), on ints, on integer tensors and compiled by Triton; then against the
crops and merges they describe; then the argument checks (exception type, and the names and values
the message must contain).
"""

from __future__ import annotations

import itertools
import os
import re

import pytest
import torch
from _messages import assert_names, raises_naming
from hypothesis import given
from hypothesis import strategies as st

import hrperc
from hrperc.ops import geometry
from hrperc.ops.crop import merge, window_permutation
from hrperc.ops.geometry import (
    KIND_CODE,
    ORDER_CODE,
    ORDERS,
    WINDOW_KINDS,
    axis_position,
    axis_window,
    check_kind,
    check_order,
    check_window_stacks,
    infer_tile_size,
    map_position,
    window_mask,
    window_of,
)

try:  # the compiled form is tested only where Triton is installed
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

SIZES = range(1, 5)
# Every (gh, gw, th, tw) with entries in 1..4: square, non-square and 1-sized axes.
SHAPES = list(itertools.product(SIZES, SIZES, SIZES, SIZES))
KINDS = list(WINDOW_KINDS)
CODES = [KIND_CODE[k] for k in KINDS]


def _expected_window_of(R, C, gh, gw, th, tw, kind):
    """The module docstring's table, written independently of the code under test."""
    if kind == "contiguous":
        return (R // th) * gw + C // tw, (R % th) * tw + C % tw
    return (R % gh) * gw + C % gw, (R // gh) * tw + C // gw


def _expected_map_position(w, t, gh, gw, th, tw, kind):
    a, e, u, v = w // gw, w % gw, t // tw, t % tw
    if kind == "contiguous":
        return a * th + u, e * tw + v
    return a + u * gh, e + v * gw


# ----------------------------------------------------------------------------------------------------
# Constants


def test_kind_and_order_codes():
    assert WINDOW_KINDS == ("contiguous", "strided")
    assert ORDERS == ("contiguous", "strided", "map")
    assert KIND_CODE == {"contiguous": 0, "strided": 1}
    assert ORDER_CODE == {"contiguous": 0, "strided": 1, "map": 2}
    # A kind's code is the same as an order: the kernel compares them (ORDER == WINDOW).
    for kind in WINDOW_KINDS:
        assert ORDER_CODE[kind] == KIND_CODE[kind]


def test_module_exports_exist():
    for name in geometry.__all__:
        assert hasattr(geometry, name), name
    assert hrperc.ops.infer_tile_size is infer_tile_size
    assert hrperc.ops.WINDOW_KINDS is WINDOW_KINDS and hrperc.ops.ORDERS is ORDERS


# ----------------------------------------------------------------------------------------------------
# (1) window_of / map_position: inverse bijections, exhaustively on small shapes


@pytest.mark.parametrize("kind", KINDS)
def test_window_of_and_map_position_are_inverse_bijections(kind):
    code = KIND_CODE[kind]
    for gh, gw, th, tw in SHAPES:
        Ht, Wt, n, t = gh * th, gw * tw, gh * gw, th * tw
        seen = set()
        for R in range(Ht):
            for C in range(Wt):
                w, k = window_of(R, C, gh, gw, th, tw, code)
                assert (w, k) == _expected_window_of(R, C, gh, gw, th, tw, kind), (gh, gw, th, tw, R, C)
                assert 0 <= w < n and 0 <= k < t, (gh, gw, th, tw, R, C, w, k)
                assert map_position(w, k, gh, gw, th, tw, code) == (R, C)
                seen.add((w, k))
        assert len(seen) == n * t  # onto every (window, token): a bijection
        positions = set()
        for w in range(n):
            for k in range(t):
                R, C = map_position(w, k, gh, gw, th, tw, code)
                assert (R, C) == _expected_map_position(w, k, gh, gw, th, tw, kind)
                assert 0 <= R < Ht and 0 <= C < Wt, (gh, gw, th, tw, w, k, R, C)
                assert window_of(R, C, gh, gw, th, tw, code) == (w, k)
                positions.add((R, C))
        assert len(positions) == Ht * Wt


def test_docstring_examples_hold():
    assert map_position(4, 0, 3, 3, 2, 2, 1) == (1, 1)
    assert window_of(1, 1, 3, 3, 2, 2, 1) == (4, 0)
    assert window_of(3, 5, 2, 2, 2, 3, 0) == (3, 5)
    assert window_of(3, 5, 2, 2, 2, 3, 1) == (3, 5)
    assert map_position(3, 5, 2, 2, 2, 3, 0) == (3, 5)
    assert map_position(3, 5, 2, 2, 2, 3, 1) == (3, 5)


def test_kinds_coincide_only_where_they_must():
    # A 1x1 grid: one window, the whole map, in both kinds. A 1x1 tile: each window one token, and the
    # contiguous and strided windows are then the same single positions.
    for gh, gw, th, tw in SHAPES:
        same = all(
            window_of(R, C, gh, gw, th, tw, 0) == window_of(R, C, gh, gw, th, tw, 1)
            for R in range(gh * th)
            for C in range(gw * tw)
        )
        # Per axis the kinds agree iff that axis has one window or one token per window.
        assert same == ((gh == 1 or th == 1) and (gw == 1 or tw == 1)), (gh, gw, th, tw)


def test_strided_windows_are_full_field_and_contiguous_windows_are_blocks():
    for gh, gw, th, tw in SHAPES:
        for w in range(gh * gw):
            a, e = divmod(w, gw)
            cont = {map_position(w, k, gh, gw, th, tw, 0) for k in range(th * tw)}
            strd = {map_position(w, k, gh, gw, th, tw, 1) for k in range(th * tw)}
            assert cont == {(a * th + u, e * tw + v) for u in range(th) for v in range(tw)}
            assert strd == {(a + u * gh, e + v * gw) for u in range(th) for v in range(tw)}


# ----------------------------------------------------------------------------------------------------
# (2) Agreement with the crops and merges


@pytest.mark.parametrize("kind", KINDS)
def test_index_maths_agree_with_crop_nlc(kind):
    code = KIND_CODE[kind]
    for gh, gw, th, tw in SHAPES:
        Ht, Wt = gh * th, gw * tw
        M = torch.arange(Ht * Wt).reshape(1, Ht * Wt, 1)
        stack = hrperc.ops.crop(M, (gh, gw), kind, layout="nlc", size=(Ht, Wt))
        assert stack.shape == (gh * gw, th * tw, 1)
        # The stack, indexed by window_of, at every position, is the map row R*Wt + C.
        R = torch.arange(Ht)[:, None].expand(Ht, Wt)
        C = torch.arange(Wt)[None, :].expand(Ht, Wt)
        w, k = window_of(R, C, gh, gw, th, tw, code)
        assert torch.equal(stack[w, k, 0], R * Wt + C), (gh, gw, th, tw)
        # And by ints, one position at a time.
        for r in range(Ht):
            for c in range(Wt):
                wi, ki = window_of(r, c, gh, gw, th, tw, code)
                assert stack[wi, ki, 0].item() == r * Wt + c


@pytest.mark.parametrize("kind", KINDS)
def test_index_maths_agree_with_merge_and_nchw_crop(kind):
    code = KIND_CODE[kind]
    for gh, gw, th, tw in SHAPES:
        Ht, Wt, n, t = gh * th, gw * tw, gh * gw, th * tw
        # merge: stack entry (w, k) holds w*T + k and lands at map_position(w, k).
        ids = torch.arange(n * t).reshape(n, t, 1)
        whole = merge(ids, (gh, gw), kind, layout="nlc", tile_size=(th, tw)).reshape(Ht, Wt)
        w = torch.arange(n)[:, None].expand(n, t)
        k = torch.arange(t)[None, :].expand(n, t)
        R, C = map_position(w, k, gh, gw, th, tw, code)
        assert torch.equal(whole[R, C], w * t + k), (gh, gw, th, tw)
        # nchw crop: window w's pixel (u, v) is token u*tw + v.
        img = torch.arange(Ht * Wt).reshape(1, 1, Ht, Wt)
        tiles = hrperc.ops.crop(img, (gh, gw), kind).reshape(n, t)
        assert torch.equal(tiles, (R * Wt + C)), (gh, gw, th, tw)


def test_window_permutation_is_the_composition_of_the_two_kinds():
    # T == S[perm]: target token (w2, k2) sits at map_position(., target), which source window_of finds.
    for gh, gw, th, tw in SHAPES:
        t = th * tw
        for source, target in itertools.product(KINDS, KINDS):
            perm = window_permutation((gh, gw), (th, tw), source, target)
            flat = torch.arange(gh * gw * t)
            R, C = map_position(flat // t, flat % t, gh, gw, th, tw, KIND_CODE[target])
            w1, k1 = window_of(R, C, gh, gw, th, tw, KIND_CODE[source])
            assert torch.equal(perm, w1 * t + k1), (gh, gw, th, tw, source, target)


# ----------------------------------------------------------------------------------------------------
# (3) Element-wise on integer tensors


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16])
def test_index_functions_are_elementwise_on_integer_tensors(dtype):
    for (gh, gw, th, tw), code in itertools.product(SHAPES, CODES):
        Ht, Wt, n, t = gh * th, gw * tw, gh * gw, th * tw
        R = torch.arange(Ht, dtype=dtype)[:, None].expand(Ht, Wt)
        C = torch.arange(Wt, dtype=dtype)[None, :].expand(Ht, Wt)
        w, k = window_of(R, C, gh, gw, th, tw, code)
        assert w.dtype == dtype and k.dtype == dtype and w.shape == (Ht, Wt)
        exp = [[window_of(r, c, gh, gw, th, tw, code) for c in range(Wt)] for r in range(Ht)]
        assert w.tolist() == [[e[0] for e in row] for row in exp]
        assert k.tolist() == [[e[1] for e in row] for row in exp]
        ws = torch.arange(n, dtype=dtype)[:, None].expand(n, t)
        ks = torch.arange(t, dtype=dtype)[None, :].expand(n, t)
        r, c = map_position(ws, ks, gh, gw, th, tw, code)
        assert r.dtype == dtype and r.shape == (n, t)
        exp = [[map_position(a, b, gh, gw, th, tw, code) for b in range(t)] for a in range(n)]
        assert r.tolist() == [[e[0] for e in row] for row in exp]
        assert c.tolist() == [[e[1] for e in row] for row in exp]
        # Round trip on tensors.
        r2, c2 = map_position(w, k, gh, gw, th, tw, code)
        assert torch.equal(r2, R) and torch.equal(c2, C)


def test_index_functions_broadcast_and_mix_ints_with_tensors():
    R = torch.tensor([0, 3, 5])
    w, k = window_of(R, 4, 2, 3, 3, 2, 1)  # tensor row, int column
    assert w.tolist() == [window_of(int(r), 4, 2, 3, 3, 2, 1)[0] for r in R]
    assert k.tolist() == [window_of(int(r), 4, 2, 3, 3, 2, 1)[1] for r in R]
    r, c = map_position(torch.tensor([[0], [5]]), torch.tensor([[0, 1, 5]]), 2, 3, 3, 2, 0)
    assert r.shape == (2, 3)
    assert r.tolist() == [[map_position(a, b, 2, 3, 3, 2, 0)[0] for b in (0, 1, 5)] for a in (0, 5)]
    assert c.tolist() == [[map_position(a, b, 2, 3, 3, 2, 0)[1] for b in (0, 1, 5)] for a in (0, 5)]


# ----------------------------------------------------------------------------------------------------
# (4) Per axis: axis_window / axis_position


@pytest.mark.parametrize("kind", KINDS)
def test_axis_functions_are_inverses_and_compose_to_the_map_functions(kind):
    code = KIND_CODE[kind]
    for g, t in itertools.product(range(1, 6), range(1, 6)):
        pairs = set()
        for r in range(g * t):
            a, u = axis_window(r, g, t, code)
            assert 0 <= a < g and 0 <= u < t
            assert axis_position(a, u, g, t, code) == r
            pairs.add((a, u))
        assert pairs == set(itertools.product(range(g), range(t)))
    for gh, gw, th, tw in SHAPES:
        for R, C in itertools.product(range(gh * th), range(gw * tw)):
            a, u = axis_window(R, gh, th, code)
            e, v = axis_window(C, gw, tw, code)
            assert window_of(R, C, gh, gw, th, tw, code) == (a * gw + e, u * tw + v)
            assert map_position(a * gw + e, u * tw + v, gh, gw, th, tw, code) == (
                axis_position(a, u, gh, th, code),
                axis_position(e, v, gw, tw, code),
            )


def test_axis_functions_on_tensors_and_docstring_examples():
    assert axis_window(5, 3, 2, 0) == (2, 1) and axis_window(5, 3, 2, 1) == (2, 1)
    assert axis_position(2, 1, 3, 2, 0) == 5 and axis_position(2, 1, 3, 2, 1) == 5
    for code in CODES:
        r = torch.arange(12)
        a, u = axis_window(r, 4, 3, code)
        assert torch.equal(axis_position(a, u, 4, 3, code), r)
        assert a.tolist() == [axis_window(i, 4, 3, code)[0] for i in range(12)]
        assert u.tolist() == [axis_window(i, 4, 3, code)[1] for i in range(12)]


# ----------------------------------------------------------------------------------------------------
# (5) window_mask


@pytest.mark.parametrize("kind", KINDS)
def test_window_mask_marks_exactly_the_window_holding_the_position(kind):
    code = KIND_CODE[kind]
    for gh, gw, th, tw in SHAPES:
        Ht, Wt = gh * th, gw * tw
        for R, C in itertools.product(range(Ht), range(Wt)):
            mask = window_mask((R, C), (gh, gw), (th, tw), kind)
            assert mask.dtype == torch.bool and mask.shape == (Ht, Wt)
            assert int(mask.sum()) == th * tw
            assert bool(mask[R, C])
            w, _ = window_of(R, C, gh, gw, th, tw, code)
            marked = {(int(r), int(c)) for r, c in mask.nonzero().tolist()}
            assert marked == {map_position(w, k, gh, gw, th, tw, code) for k in range(th * tw)}


def test_window_mask_matches_merged_one_hot_stack_and_docstring():
    for (gh, gw, th, tw), kind in itertools.product(SHAPES, KINDS):
        n, t = gh * gw, th * tw
        for w in range(n):
            onehot = torch.zeros(n, t, 1, dtype=torch.bool)
            onehot[w] = True
            expected = merge(onehot, (gh, gw), kind, layout="nlc", tile_size=(th, tw)).reshape(gh * th, gw * tw)
            R, C = map_position(w, 0, gh, gw, th, tw, KIND_CODE[kind])
            assert torch.equal(window_mask((R, C), (gh, gw), (th, tw), kind), expected)
    got = window_mask((0, 0), (2, 2), (2, 2), "strided").int().tolist()
    assert got == [[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    # Int grid / tile_size mean square ones.
    assert torch.equal(window_mask((1, 2), 2, 3, "contiguous"), window_mask((1, 2), (2, 2), (3, 3), "contiguous"))


def test_window_mask_refuses_bad_arguments():
    with pytest.raises(ValueError) as e:
        window_mask((0, 0), (2, 2), (2, 2), "tiles")
    assert_names(str(e.value), "kind='tiles'", "('contiguous', 'strided')")
    with raises_naming(ValueError, "position=(-1, 0)", ">= 0"):
        window_mask((-1, 0), (2, 2), (2, 2), "strided")
    with raises_naming(ValueError, "grid=(0, 2)", ">= 1"):
        window_mask((0, 0), (0, 2), (2, 2), "strided")
    with raises_naming(ValueError, "tile_size=(2, 0)", ">= 1"):
        window_mask((0, 0), (2, 2), (2, 0), "strided")


# ----------------------------------------------------------------------------------------------------
# (6) infer_tile_size


def test_infer_tile_size_infers_square_counts():
    for s in range(1, 40):
        assert infer_tile_size(s * s) == (s, s)
    assert infer_tile_size(576) == (24, 24)
    assert all(type(v) is int for v in infer_tile_size(576))


@pytest.mark.parametrize("tokens", [2, 3, 5, 8, 24, 575, 577, 1000])
@pytest.mark.parametrize("arg", ["tile_size", "size"])
def test_infer_tile_size_refuses_non_square_counts(tokens, arg):
    with pytest.raises(ValueError) as e:
        infer_tile_size(tokens, arg=arg)
    msg = str(e.value)
    # named once, by the public function called (a helper's caller names itself: see the next test)
    assert_names(msg, f"{tokens} tokens", f"{arg}=(rows, cols)")
    assert msg.startswith("infer_tile_size: ") and msg.count("infer_tile_size") == 1, msg


def test_tile_size_errors_are_named_by_the_public_function_called():
    with raises_naming(ValueError, "(1, 20, 8)", "20 tokens per map", "size=(rows, cols)") as info:
        hrperc.local_crop(torch.randn(1, 20, 8), (2, 2), layout="nlc")
    assert str(info.value).startswith("local_crop: ") and "infer_tile_size" not in str(info.value)
    with raises_naming(ValueError, "(4, 6, 2)", "6 tokens") as info:
        hrperc.permute_windows(torch.randn(4, 6, 2), (2, 2), "contiguous", "strided")
    assert str(info.value).startswith("permute_windows: ")


def test_infer_tile_size_quotes_shape_and_what():
    with pytest.raises(ValueError) as e:
        infer_tile_size(24, shape=(1, 24, 3), arg="size", what="tokens per map")
    msg = str(e.value)
    assert "(1, 24, 3)" in msg and "tokens per map" in msg and "size=" in msg
    with pytest.raises(ValueError) as e:
        infer_tile_size(24, (5, 5), shape=torch.Size([4, 24, 8]))
    assert "(4, 24, 8)" in str(e.value)


@pytest.mark.parametrize("tokens,tile", [(24, (5, 5)), (24, (4, 5)), (9, (1, 3)), (12, 4), (1, (1, 2))])
@pytest.mark.parametrize("arg", ["tile_size", "size"])
def test_infer_tile_size_refuses_explicit_sizes_of_the_wrong_count(tokens, tile, arg):
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    with pytest.raises(ValueError) as e:
        infer_tile_size(tokens, tile, arg=arg)
    msg = str(e.value)
    assert str(tokens) in msg and str(th * tw) in msg and f"{arg}=({th}, {tw})" in msg


EXPLICIT = [
    (24, (4, 6), (4, 6)),
    (24, (6, 4), (6, 4)),
    (24, (1, 24), (1, 24)),
    (1, (1, 1), (1, 1)),
    (9, 3, (3, 3)),
    (7, [7, 1], (7, 1)),
]


@pytest.mark.parametrize("tokens,tile,expected", EXPLICIT)
def test_infer_tile_size_returns_correct_explicit_sizes(tokens, tile, expected):
    got = infer_tile_size(tokens, tile)
    assert got == expected and type(got) is tuple


@pytest.mark.parametrize("tokens", [0, -1, -4, -9])
def test_infer_tile_size_refuses_zero_and_negative_counts(tokens):
    with pytest.raises(ValueError) as e:
        infer_tile_size(tokens)
    assert str(tokens) in str(e.value)
    with pytest.raises(ValueError):
        infer_tile_size(tokens, (1, 1))


def test_infer_tile_size_refuses_malformed_tile_sizes():
    with pytest.raises(ValueError) as e:
        infer_tile_size(0, (0, 4))
    assert_names(str(e.value), "tile_size=(0, 4)", ">= 1")
    with pytest.raises(TypeError) as e:
        infer_tile_size(4, (2.0, 2), arg="size")
    assert_names(str(e.value), "size=(2.0, 2)", "float")
    with pytest.raises(TypeError):
        infer_tile_size(4, "22")


# ----------------------------------------------------------------------------------------------------
# (7) check_window_stacks


def test_check_window_stacks_returns_grid_and_tile():
    x = torch.zeros(8, 9, 4)
    assert check_window_stacks((2, 2), local=x, strided=x.clone()) == ((2, 2), (3, 3))
    assert check_window_stacks((1, 3), q=torch.zeros(6, 12, 2), tile_size=(3, 4)) == ((1, 3), (3, 4))
    assert check_window_stacks(2, q=torch.zeros(4, 1, 1)) == ((2, 2), (1, 1))
    q = torch.zeros(12, 6, 2, 8)
    assert check_window_stacks((3, 2), (2, 3), ndim=4, q=q, k=q, v=q) == ((3, 2), (2, 3))


def test_check_window_stacks_refuses_non_tensors():
    with pytest.raises(TypeError) as e:
        check_window_stacks((2, 2), q=torch.zeros(4, 4, 1), k=[[0.0]])
    msg = str(e.value)
    assert_names(msg, re.compile(r"\bk\b"), "list", "torch.Tensor")
    assert msg.startswith("k is a list")  # a helper names no caller: the caller's public boundary does
    with pytest.raises(TypeError) as e:
        check_window_stacks((2, 2), query=None)
    assert "query" in str(e.value) and "NoneType" in str(e.value)


def test_check_window_stacks_refuses_wrong_ndim():
    with pytest.raises(ValueError) as e:
        check_window_stacks((2, 2), q=torch.zeros(4, 4))
    msg = str(e.value)
    assert_names(msg, re.compile(r"\bq\b"), "(4, 4)", "2 dims", "3 dims")
    with pytest.raises(ValueError) as e:
        check_window_stacks((2, 2), ndim=4, layout="(B*N, T, H, Dh)", q=torch.zeros(4, 4, 8))
    msg = str(e.value)
    assert "(4, 4, 8)" in msg and "4 dims" in msg and "(B*N, T, H, Dh)" in msg
    assert "unflatten" in msg  # the 4-dim case says how to split heads


def test_check_window_stacks_refuses_mismatched_shapes():
    with pytest.raises(ValueError) as e:
        check_window_stacks((2, 2), q=torch.zeros(4, 4, 8), k=torch.zeros(4, 4, 8), v=torch.zeros(4, 9, 8))
    msg = str(e.value)
    assert_names(msg, re.compile(r"\bq\b"), re.compile(r"\bv\b"), "(4, 4, 8)", "(4, 9, 8)")


@pytest.mark.parametrize("first", [0, 3, 5, 6])
def test_check_window_stacks_refuses_first_dim_not_a_positive_multiple_of_n(first):
    with pytest.raises(ValueError) as e:
        check_window_stacks((2, 2), local=torch.zeros(first, 4, 1))
    msg = str(e.value)
    assert_names(msg, re.compile(r"\blocal\b"), f"({first}, 4, 1)", "N = gh*gw = 2*2 = 4", "grid")


def test_check_window_stacks_validates_the_tile_size():
    with pytest.raises(ValueError) as e:
        check_window_stacks((2, 1), q=torch.zeros(2, 6, 3))
    msg = str(e.value)
    assert_names(msg, "6 tokens", "tile_size=", "(2, 6, 3)")
    with pytest.raises(ValueError) as e:
        check_window_stacks((2, 1), (3, 3), q=torch.zeros(2, 6, 3))
    msg = str(e.value)
    assert "6" in msg and "9" in msg and "tile_size=(3, 3)" in msg
    assert check_window_stacks((2, 1), (2, 3), q=torch.zeros(2, 6, 3)) == ((2, 1), (2, 3))
    assert check_window_stacks((2, 1), (6, 1), q=torch.zeros(2, 6, 3)) == ((2, 1), (6, 1))


def test_check_window_stacks_refuses_bad_grids():
    with pytest.raises(ValueError) as e:
        check_window_stacks((0, 2), q=torch.zeros(4, 4, 1))
    assert_names(str(e.value), "grid=(0, 2)", ">= 1")
    with pytest.raises(TypeError) as e:
        check_window_stacks((2, 2.5), q=torch.zeros(4, 4, 1))
    assert_names(str(e.value), "grid=(2, 2.5)", "float")


# ----------------------------------------------------------------------------------------------------
# (8) check_kind / check_order


@pytest.mark.parametrize("value", ["contiguous", "strided"])
def test_check_kind_and_order_accept_valid_values(value):
    assert check_kind(value, "window") == value
    assert check_order(value, "q_order") == value
    assert check_order(value, "q_order", allow_map=False) == value
    assert check_order("map", "q_order") == "map"


@pytest.mark.parametrize("value", ["local", "map", "Strided", "", None, 0, 1])
def test_check_kind_refuses_unknown_values(value):
    with pytest.raises(ValueError) as e:
        check_kind(value, "window")
    msg = str(e.value)
    assert msg.startswith(f"window={value!r}")  # a helper names no caller: the caller's public boundary does
    assert "'contiguous'" in msg and "'strided'" in msg


@pytest.mark.parametrize("value", ["local", "global", "row-major", None, 2])
def test_check_order_refuses_unknown_values(value):
    with pytest.raises(ValueError) as e:
        check_order(value, "kv_order")
    msg = str(e.value)
    assert msg.startswith(f"kv_order={value!r}")
    assert "'contiguous'" in msg and "'strided'" in msg and "'map'" in msg


def test_check_order_without_map_refuses_map():
    with pytest.raises(ValueError) as e:
        check_order("map", "out_order", allow_map=False)
    msg = str(e.value)
    assert "out_order='map'" in msg and "'contiguous'" in msg and "'strided'" in msg
    assert "('contiguous', 'strided')" in msg  # the choices offered do not include 'map'


# ----------------------------------------------------------------------------------------------------
# (9) Properties on random grids and tiles

shapes = st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 12), st.integers(1, 12))


@given(shape=shapes, kind=st.sampled_from(KINDS), data=st.data())
def test_property_bijection_on_random_positions(shape, kind, data):
    gh, gw, th, tw = shape
    code = KIND_CODE[kind]
    R = data.draw(st.integers(0, gh * th - 1), label="R")
    C = data.draw(st.integers(0, gw * tw - 1), label="C")
    w, k = window_of(R, C, gh, gw, th, tw, code)
    assert 0 <= w < gh * gw and 0 <= k < th * tw
    assert (w, k) == _expected_window_of(R, C, gh, gw, th, tw, kind)
    assert map_position(w, k, gh, gw, th, tw, code) == (R, C)
    w2 = data.draw(st.integers(0, gh * gw - 1), label="w")
    k2 = data.draw(st.integers(0, th * tw - 1), label="k")
    r, c = map_position(w2, k2, gh, gw, th, tw, code)
    assert 0 <= r < gh * th and 0 <= c < gw * tw
    assert window_of(r, c, gh, gw, th, tw, code) == (w2, k2)


@given(shape=shapes, kind=st.sampled_from(KINDS))
def test_property_whole_map_is_a_permutation_and_matches_crop(shape, kind):
    gh, gw, th, tw = shape
    code = KIND_CODE[kind]
    Ht, Wt, t = gh * th, gw * tw, th * tw
    R = torch.arange(Ht)[:, None].expand(Ht, Wt)
    C = torch.arange(Wt)[None, :].expand(Ht, Wt)
    w, k = window_of(R, C, gh, gw, th, tw, code)
    flat = (w * t + k).reshape(-1)
    assert torch.equal(flat.sort().values, torch.arange(Ht * Wt))  # onto, hence a bijection
    r, c = map_position(w, k, gh, gw, th, tw, code)
    assert torch.equal(r, R) and torch.equal(c, C)
    stack = hrperc.ops.crop(torch.arange(Ht * Wt).reshape(1, -1, 1), (gh, gw), kind, layout="nlc", size=(Ht, Wt))
    assert torch.equal(stack[w, k, 0], R * Wt + C)


@given(g=st.integers(1, 30), t=st.integers(1, 30), kind=st.sampled_from(CODES), data=st.data())
def test_property_axis_functions_are_inverses(g, t, kind, data):
    r = data.draw(st.integers(0, g * t - 1), label="r")
    a, u = axis_window(r, g, t, kind)
    assert 0 <= a < g and 0 <= u < t
    assert axis_position(a, u, g, t, kind) == r


@given(s=st.integers(1, 200), extra=st.integers(1, 400))
def test_property_infer_tile_size_square_iff_perfect_square(s, extra):
    assert infer_tile_size(s * s) == (s, s)
    n = s * s + extra
    if extra < 2 * s + 1:  # strictly between s^2 and (s+1)^2
        with raises_naming(ValueError, f"{n} tokens", "tile_size="):
            infer_tile_size(n)
    else:
        side = int(n**0.5 + 0.5)
        if side * side == n:
            assert infer_tile_size(n) == (side, side)
        else:
            with pytest.raises(ValueError, match=str(n)):
                infer_tile_size(n)


# ----------------------------------------------------------------------------------------------------
# (10) The Triton-compiled form (as the fused kernel compiles it)

if triton is not None:
    # The functions exactly as the fused kernel compiles them. (A bare triton.jit(geometry.window_of) is
    # refused by Triton's CPU interpreter, which wants triton.language in the function's module globals;
    # the kernel module compiles a copy whose globals add it, leaving geometry itself free of Triton.)
    from hrperc.attention.kernels import window_attention as _wa

    _jit_window_of = _wa._window_of
    _jit_map_position = _wa._map_position

    @triton.jit
    def _geometry_kernel(
        ROWS,
        COLS,
        WINS,
        TOKS,
        GH: tl.constexpr,
        GW: tl.constexpr,
        TH: tl.constexpr,
        TW: tl.constexpr,
        KIND: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offs = tl.arange(0, BLOCK)
        T: tl.constexpr = TH * TW
        WT: tl.constexpr = GW * TW
        mask = offs < GH * GW * T
        # Flat stack index -> (window, token) -> map position.
        row, col = _jit_map_position(offs // T, offs % T, GH, GW, TH, TW, KIND)
        tl.store(ROWS + offs, row, mask=mask)
        tl.store(COLS + offs, col, mask=mask)
        # Flat map row -> (R, C) -> (window, token).
        win, tok = _jit_window_of(offs // WT, offs % WT, GH, GW, TH, TW, KIND)
        tl.store(WINS + offs, win, mask=mask)
        tl.store(TOKS + offs, tok, mask=mask)


@pytest.mark.parametrize("shape", [(2, 3, 3, 2), (1, 4, 2, 1), (3, 1, 1, 3)])
@pytest.mark.parametrize("kind", KINDS)
def test_triton_compiled_index_functions_match_python(shape, kind):
    pytest.importorskip("triton")
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not interpret and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or a CUDA GPU")
    device = "cpu" if interpret else "cuda"
    gh, gw, th, tw = shape
    code = KIND_CODE[kind]
    n, t, Wt = gh * gw, th * tw, gw * tw
    total = n * t
    block = triton.next_power_of_2(total)
    out = [torch.full((block,), -1, dtype=torch.int32, device=device) for _ in range(4)]
    _geometry_kernel[(1,)](*out, gh, gw, th, tw, code, block)
    rows, cols, wins, toks = (o.cpu()[:total] for o in out)
    assert all(int(o.cpu()[total:].eq(-1).all()) for o in out)  # the mask kept the tail untouched
    flat = torch.arange(total)
    r, c = map_position(flat // t, flat % t, gh, gw, th, tw, code)
    w, k = window_of(flat // Wt, flat % Wt, gh, gw, th, tw, code)
    assert rows.tolist() == r.tolist() and cols.tolist() == c.tolist()
    assert wins.tolist() == w.tolist() and toks.tolist() == k.tolist()
    # Compiling and running them left the Python module untouched (no Triton names leaked into it).
    assert not any(name in vars(geometry) for name in ("tl", "triton"))
