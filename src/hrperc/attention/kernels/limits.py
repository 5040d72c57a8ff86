"""The fused kernel's limits, stated once: the dtypes and head dims it runs, how it pads the head dim, where it runs.

Everything that needs them reads them from here: the ``"triton"`` backend's declared capabilities and
its check (backend selection, :mod:`hrperc.attention.kernels`), the launcher's guard for direct calls
and its padding of the head dim (:mod:`hrperc.attention.kernels.window_attention`), and the messages
that refuse inputs outside them. Triton is not imported here, so ``import hrperc`` stays light.

Example::

    >>> import torch
    >>> from hrperc.attention.kernels.limits import block_d, kernel_supports
    >>> block_d(40), block_d(8)                          # padded to a power of two >= 16
    (64, 16)
    >>> kernel_supports(torch.zeros(4, 9, 2, 512), interpret=True)
    'head_dim 512 exceeds 256'
"""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "MAX_HEAD_DIM", "MIN_BLOCK_D", "block_d", "kernel_supports"]

#: The dtypes the kernel computes in: fp16/bf16 accumulate in fp32; fp32 uses IEEE (not TF32) products.
DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
#: The largest head dim: one padded query tile and the streamed key/value tiles of that width must fit
#: in shared memory with the smallest tiling (see ``_smem_bytes`` in the kernel module).
MAX_HEAD_DIM = 256
#: The smallest padded head dim: ``tl.dot`` needs every dimension >= 16 on real hardware.
MIN_BLOCK_D = 16


def block_d(head_dim: int) -> int:
    """``head_dim`` padded for the kernel (its ``BLOCK_D``): the next power of two, at least :data:`MIN_BLOCK_D`.

    Triton tiles are powers of two; the channels past ``head_dim`` are masked off.
    """
    return max(MIN_BLOCK_D, 1 << max(head_dim - 1, 0).bit_length())


def kernel_supports(q: torch.Tensor, *, interpret: bool) -> str | None:
    """``None`` when the kernel can run on ``q`` (``(..., head_dim)``), else the reason, shown to users.

    The dtype (:data:`DTYPES`), the head dim (:data:`MAX_HEAD_DIM`) and the device: CUDA, or the CPU when
    Triton runs its interpreter (``interpret``: ``TRITON_INTERPRET=1`` when Triton was imported).
    ``k`` and ``v`` share ``q``'s dtype and device (checked by :func:`hrperc.window_attention`).
    """
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} is not one of {DTYPES}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} exceeds {MAX_HEAD_DIM}"
    if q.is_cuda or (q.device.type == "cpu" and interpret):
        return None
    return (
        f"tensors are on {q.device}; the Triton kernel needs a CUDA GPU (or TRITON_INTERPRET=1 set before "
        f"triton is imported, a slow correctness path on CPU)"
    )
