"""The Triton kernel's self-check: ``backend="auto"`` trusts the kernel only after it matched SDPA.

On a CPU the kernel runs in Triton's interpreter; "auto" only considers it for CUDA tensors, so a CPU
tensor that says it is on CUDA stands in (as in the broken-Triton fallback test).
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from _messages import raises_naming, warns_naming

import hrperc
from hrperc.attention import get_backend, kernels, resolve_backend
from hrperc.attention.dispatch import BackendUnavailableError

pytestmark = pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton")

KW = dict(
    grid=(2, 2),
    tile_size=(2, 3),
    window="strided",
    q_order="contiguous",
    kv_order="strided",
    out_order="strided",
    scale=0.25,
)


class LooksLikeCuda(torch.Tensor):
    """A CPU tensor whose ``.device`` says CUDA ("auto" only considers the kernel for CUDA tensors).

    Every torch operation sees the plain CPU tensor behind it, so what the self-check builds ``.to(q)``
    (and SDPA) runs on the CPU.
    """

    is_cuda = True
    device = torch.device("cuda")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            plain = torch.utils._pytree.tree_map(
                lambda x: x.as_subclass(torch.Tensor) if isinstance(x, LooksLikeCuda) else x, (args, kwargs or {})
            )
            return func(*plain[0], **plain[1])


def _inputs(dtype=torch.float32, head_dim=16):
    q, k, v = (torch.randn(4, 6, 2, head_dim, dtype=dtype) for _ in range(3))
    return q.as_subclass(LooksLikeCuda), k.as_subclass(LooksLikeCuda), v.as_subclass(LooksLikeCuda)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(kernels, "_SELF_CHECKS", {})
    monkeypatch.delenv("HRPERC_ATTN_BACKEND", raising=False)
    kernels._kernel_module()  # the real kernels import (the interpreter on CPU)


def _patch_kernel(monkeypatch, fn):
    monkeypatch.setattr(kernels._kernel_module(), "triton_window_attention", fn)


def test_auto_picks_triton_after_a_passing_self_check_and_caches_the_verdict(monkeypatch):
    q, k, v = _inputs()
    real = kernels._kernel_module().triton_window_attention
    calls = []

    def counted(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    _patch_kernel(monkeypatch, counted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", q, k, v, **KW).name == "triton"
    assert calls == [(4, 65, 2, 16)]  # the small self-check inputs, not the user's
    assert resolve_backend("auto", q, k, v, **KW).name == "triton"
    assert len(calls) == 1  # cached per key
    assert list(kernels._SELF_CHECKS.values()) == [None]


@pytest.mark.parametrize(
    "broken, reason",
    [
        ("raises", "RuntimeError: simulated launch failure"),
        ("wrong_output", "output differs from SDPA's"),
        ("wrong_grad", "dq differs from SDPA's"),
        ("nan", "NaN or Inf"),
    ],
)
def test_auto_falls_back_to_sdpa_with_one_warning_when_the_self_check_fails(monkeypatch, broken, reason):
    q, k, v = _inputs()
    real = kernels._kernel_module().triton_window_attention

    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 3

    def bad(q_, k_, v_, *a, **kw):
        if broken == "raises":
            raise RuntimeError("simulated launch failure")
        if broken == "wrong_grad":
            return real(WrongGrad.apply(q_), k_, v_, *a, **kw)
        out = real(q_, k_, v_, *a, **kw)
        return out + 0.5 if broken == "wrong_output" else out * float("nan")

    _patch_kernel(monkeypatch, bad)
    with warns_naming(
        RuntimeWarning, "self-check", reason, "backend='triton'", "torch.float32", "head_dim 16", "window='strided'"
    ) as record:
        assert resolve_backend("auto", q, k, v, **KW).name == "sdpa"
    assert sum(issubclass(w.category, RuntimeWarning) for w in record) == 1
    with warnings.catch_warnings():  # one warning per key: the verdict is remembered
        warnings.simplefilter("error")
        assert resolve_backend("auto", q, k, v, **KW).name == "sdpa"
    # sdpa really runs through the public function, and gives the right answer
    sdpa, ran = get_backend("sdpa"), []

    def spy(*a, **kw):
        ran.append(True)
        out = sdpa.fn(*(x.as_subclass(torch.Tensor) for x in a[:3]), *a[3:], **kw)
        return out.as_subclass(LooksLikeCuda)  # on q's device, as a real CUDA backend's output (checked)

    monkeypatch.setitem(hrperc.attention.dispatch._REGISTRY, "sdpa", dataclasses.replace(sdpa, fn=spy))
    kw = dict(window="strided", q_order="contiguous", kv_order="strided", tile_size=(2, 3), scale=0.25)
    out = hrperc.window_attention(q, k, v, KW["grid"], backend="auto", **kw)
    assert ran == [True]
    plain = [x.as_subclass(torch.Tensor) for x in (q, k, v)]
    expected = sdpa.fn(*plain, KW["grid"], out_order="strided", **kw)
    torch.testing.assert_close(out.as_subclass(torch.Tensor), expected, rtol=0, atol=0)


def test_the_verdict_is_per_dtype_head_dim_and_orders(monkeypatch):
    calls = []

    def bad(*a, **kw):
        calls.append((a[0].dtype, a[0].shape[-1], kw["q_order"]))
        raise RuntimeError("simulated")

    _patch_kernel(monkeypatch, bad)
    with pytest.warns(RuntimeWarning) as record:
        for dtype, head_dim, q_order in [
            (torch.float32, 16, "contiguous"),
            (torch.float16, 16, "contiguous"),
            (torch.float32, 32, "contiguous"),
            (torch.float32, 16, "strided"),
            (torch.float32, 16, "contiguous"),
        ]:
            q, k, v = _inputs(dtype, head_dim)
            assert resolve_backend("auto", q, k, v, **{**KW, "q_order": q_order}).name == "sdpa"
    assert len(calls) == 4 and len(record) == 4  # the fifth is the first key again: cached


def test_forced_triton_skips_the_self_check(monkeypatch):
    q, k, v = _inputs()

    def must_not_run(*a, **kw):
        raise AssertionError("the self-check ran for a forced backend")

    monkeypatch.setattr(kernels, "_run_self_check", must_not_run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("triton", q, k, v, **KW).name == "triton"
        monkeypatch.setenv("HRPERC_ATTN_BACKEND", "triton")
        assert resolve_backend("auto", q, k, v, **KW).name == "triton"
        monkeypatch.delenv("HRPERC_ATTN_BACKEND")
        with hrperc.attention_backend("triton"):
            assert resolve_backend("auto", q, k, v, **KW).name == "triton"
    assert kernels._SELF_CHECKS == {}
    # and a failed verdict does not stop a forced backend either
    kernels._SELF_CHECKS[(q.device, q.dtype, 16, "strided", "contiguous", "strided", "strided")] = "simulated"
    assert resolve_backend("triton", q, k, v, **KW).name == "triton"


def test_self_check_is_an_auto_only_field_of_the_backend():
    triton = get_backend("triton")
    assert triton.auto_check is kernels.triton_self_check
    q = torch.zeros(4, 6, 2, 16)
    assert triton.supports(q) is None or "TRITON_INTERPRET" in triton.supports(q)  # supports() never self-checks
    assert kernels._SELF_CHECKS == {}
    with raises_naming(TypeError, "auto_check", "callable"):
        hrperc.attention.AttentionBackend("x", lambda *a, **k: None, auto_check="yes")


def test_a_failed_self_check_shows_in_the_no_backend_error(monkeypatch):
    q, k, v = _inputs()
    _patch_kernel(monkeypatch, lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("simulated")))
    for name in ("reference", "sdpa"):  # only the kernel is left for "auto"
        monkeypatch.setitem(
            hrperc.attention.dispatch._REGISTRY, name, hrperc.attention.AttentionBackend(name, lambda *a, **kw: None)
        )
    with pytest.warns(RuntimeWarning, match="self-check"):
        with raises_naming(BackendUnavailableError, "triton: can run when forced", "RuntimeError: simulated"):
            resolve_backend("auto", q, k, v, **KW)


def test_the_self_check_leaves_the_global_rng_and_inference_mode_alone():
    q, k, v = _inputs()
    state = torch.get_rng_state()
    with torch.inference_mode():
        assert resolve_backend("auto", q, k, v, **KW).name == "triton"
    assert torch.equal(torch.get_rng_state(), state)
    assert list(kernels._SELF_CHECKS.values()) == [None]


def test_under_torch_compile_an_unchecked_key_is_not_trusted_and_a_checked_one_is():
    # While dynamo traces there are only fake tensors: nothing can run, so "auto" passes over the kernel
    # (without caching a verdict); a verdict from an earlier eager call is used as is.
    kw = dict(window="strided", q_order="contiguous", kv_order="strided", out_order="strided")

    def f(q):
        return q * (1 if kernels.triton_self_check(q, **kw) is None else 2)

    q = torch.randn(4, 6, 2, 16)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(q), q * 2)
    assert kernels._SELF_CHECKS == {}
    kernels._SELF_CHECKS[(q.device, q.dtype, 16, "strided", "contiguous", "strided", "strided")] = None
    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(q), q)
    torch._dynamo.reset()
