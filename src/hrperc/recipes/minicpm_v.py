"""``minicpm_v``: MiniCPM-V's LLaVA-UHD slices -- a source image and a grid of slices, on the model's own tower.

Exactly transformers' ``MiniCPMV4_6ImageProcessor`` (MiniCPM-V 4.6, model type ``minicpmv4_6``; MiniCPM-V 4.7,
``minicpmv4_7``, the newest in transformers, uses the same image processor, tower and merger, with the same
defaults -- it differs only in its LLM's positions) followed by the model's ``get_image_features``::

    image (H, W) --slice grid from the aspect and the slice budget (hrperc.ops.slices)--> (rows, cols) or none
          --resize (bicubic, antialias, uint8 kept)--> the source image (h0, w0), s**2 px at the image's aspect
          --resize to (rows * sh, cols * sw), cut--> rows * cols slices of (sh, sw), row-major
          --tower, EVERY view of the batch in one packed pass, attention per view; the window merger after
            layer insert_layer_id merges 2 x 2 patches--> (h / 2p, w / 2p) features per view
          --2 x 2 cells on the channels--> (h / 4p, w / 4p) tokens of width 4D per view

**Tokens and slots.** The processor writes, per image, ``<image>``, the source's tokens, ``</image>``, then the
slices row by row, each ``<slice>``, its tokens, ``</slice>``, the rows joined by ``"\\n"``
(:func:`hrperc.ops.slices.num_tokens` tokens, what :meth:`~hrperc.HighResEncoder.num_tokens` returns). The
encoder's tokens are laid out the same way: every marker is a one-token run (``source`` ``"image_start"``,
``"image_end"``, ``"slice_start"``, ``"slice_end"``, ``"row_end"``) marked as a slot (zeros,
``EncoderOutput.slot_mask``); the ``"source"`` and ``"slice"`` runs hold the features, so ``tokens[~slot_mask]``
-- ``hrperc.ops.slices.num_image_tokens`` of them, the count of the processor's image token -- is what the
model reads, in its order. The ``<image_id>k</image_id>`` prefix numbers the images of a text; the attached
processor writes it.

**The projector.** The model's ``merger`` (``MiniCPMV4_6Merger``) gathers each 2 x 2 cell of the tower's map
(patch-major on the channels: channel ``(i * 2 + j) * D + c`` is channel ``c`` of the cell's patch ``(i, j)``)
and maps it to the LLM's width; a token here is that cell, so ``project=`` the model's merger gives the LLM's
tokens (:class:`MergerProjector`, taken automatically for a merger): ``enc(images,
project=model.model.merger)``. The tower's features are the recipe's (``token_width = 4 D``), so a DEM
(``dcm=True``) works on the tower's own width and the merger stays the model's.

``dcm=True``: INF-LLaVA's dual perspectives on the slices -- the strided views of the refined image (the same
grid, the same slice size) go through the tower too, the DEM (``dem=``, default a fresh one with
``reduction="none"``) enhances the slices' map with them and the enhanced map takes its place: the same layout,
the same count. The source image is left as it is.

Options (the image processor's names): ``scale_resolution`` (448), ``max_slice_nums`` (9), ``slice_mode``
(True), ``downsample_mode`` (``"16x"``; ``"4x"`` skips the window merger: 4x the tokens), ``dcm``, ``dem`` and
the encoder options (``max_batch``, ``train_backbone``, ``grad_checkpointing``, ``check_range``; ``layer`` is
the tower's last, -1, the only one the model reads). ``backbone`` is the model's ``vision_tower`` (a
``MiniCPMV4_6VisionModel``) or a :class:`MiniCPMVBackbone`.

Example::

    >>> import torch, hrperc
    >>> from transformers.models.minicpmv4_6.modeling_minicpmv4_6 import MiniCPMV4_6VisionModel
    >>> from transformers.models.minicpmv4_6.configuration_minicpmv4_6 import MiniCPMV4_6VisionConfig
    >>> config = MiniCPMV4_6VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                  num_attention_heads=2, patch_size=14, image_size=70, insert_layer_id=0)
    >>> enc = hrperc.create_encoder("minicpm_v", MiniCPMV4_6VisionModel(config).eval())
    >>> enc.num_tokens((500, 900)), enc.num_tokens((40, 60)), enc.token_width      # 1 x 2 slices; none
    (200, 72, 128)
    >>> out = enc([torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)])
    >>> out.tokens.shape, out.slot_mask[0].nonzero().flatten().tolist()          # <image> 7 x 10 </image>
    (torch.Size([1, 72, 128]), [0, 71])
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .._errors import public
from .._validation import as_bool, as_int
from ..backbones.base import VisionBackbone, class_name, resolve_layer
from ..modules.frontend import FrontEnd, ViewPlan, make_layout, slot_mask
from ..ops import preprocess as pp
from ..ops import slices
from ..ops.canvas import CropGeometry
from ..ops.crop import local_crop, stride_crop
from . import register_recipe
from ._common import build, split_options

__all__ = ["build_minicpm_v", "MiniCPMVBackbone", "MiniCPMVFrontEnd", "MiniCPMVPlan", "MergerProjector"]

#: MiniCPM-V's processors normalize with mean = std = 0.5 (``IMAGENET_STANDARD_MEAN`` / ``_STD``).
MINICPM_V_MEAN = (0.5, 0.5, 0.5)
MINICPM_V_STD = (0.5, 0.5, 0.5)
#: The one-token marker runs of the layout (see the module docs), in the processor's words.
MARKERS = ("image_start", "image_end", "slice_start", "slice_end", "row_end")
_WHAT_TO_PASS = (
    "Pass the vision tower of a MiniCPM-V model: model.model.vision_tower (a MiniCPMV4_6VisionModel or "
    "MiniCPMV4_7VisionModel) of a MiniCPMV4_6ForConditionalGeneration / MiniCPMV4_7ForConditionalGeneration."
)


# --- the tower ------------------------------------------------------------------------------------------------
def is_minicpm_v_tower(tower) -> bool:
    """Whether ``tower`` is a transformers MiniCPM-V vision model (the parts :class:`MiniCPMVBackbone` runs)."""
    emb = getattr(tower, "embeddings", None)
    parts = ("patch_embedding", "position_embedding", "num_patches_per_side")
    return (
        isinstance(tower, nn.Module)
        and emb is not None
        and all(hasattr(emb, a) for a in parts)
        and all(hasattr(tower, a) for a in ("encoder", "post_layernorm", "vit_merger"))
    )


def _position_ids(gh: int, gw: int, side: int, device) -> torch.Tensor:
    """The tower's position ids of a ``(gh, gw)`` patch grid: each row / column's nearest cell of its
    ``side x side`` table (transformers' ``get_vision_nearest_position_ids``, the same operations)."""
    boundaries = torch.arange(1 / side, 1.0, 1 / side, device=device)
    rows = torch.bucketize(torch.arange(gh, device=device) / gh, boundaries, right=True)
    cols = torch.bucketize(torch.arange(gw, device=device) / gw, boundaries, right=True)
    return (rows[:, None] * side + cols).flatten()


class MiniCPMVBackbone(VisionBackbone):
    """A transformers MiniCPM-V vision tower as an hrperc backbone: views of any size (whole ``p * merge``
    pixels), every view of a batch in one packed pass with attention per view (``packs_views``).

    The tower is SigLIP with NaViT position ids and, after layer ``insert_layer_id``, a window merger that
    merges each 2 x 2 block of patches (``downsample_mode="16x"``; ``"4x"`` skips it). Features are the tower's
    output (``post_layernorm``): per view ``(h / 2p) * (w / 2p)`` in raster order (``"4x"``: ``(h / p) * (w /
    p)``), of the tower's width -- ``get_image_features``' ``last_hidden_state``. The model's own pass loops over
    the views for every attention call; here each distinct view size is one SDPA call per layer and the
    merger's 2 x 2 windows one call for all views. Without autograd the pass holds about half of what the
    model's holds at its peak, bit for bit the same features (``_run_lean``).

    Args:
        tower: ``model.model.vision_tower`` of a MiniCPM-V 4.6 / 4.7 model.
        layer: -1 (the tower's output), the only layer the model reads.
        mean, std: normalization of ``[0, 1]`` RGB; ``None``: 0.5 / 0.5, the processors'.
        downsample_mode: ``"16x"`` (the window merger runs) or ``"4x"`` (it does not).
    """

    family = "minicpm_v"
    dynamic_size = True
    packs_views = True
    packs_pixels = True  # features_packed(..., pixels=True): normalizes each stack right before its convolution

    @public(name=class_name())
    def __init__(self, tower, *, layer: int = -1, mean=None, std=None, downsample_mode: str = "16x") -> None:
        if not is_minicpm_v_tower(tower):
            inner = getattr(getattr(tower, "model", tower), "vision_tower", None)
            hint = " It holds one: pass its .model.vision_tower." if is_minicpm_v_tower(inner) else ""
            raise TypeError(f"tower={type(tower).__name__} is not a MiniCPM-V vision tower.{hint} {_WHAT_TO_PASS}")
        if downsample_mode not in slices.DOWNSAMPLE_MODES:
            raise ValueError(
                f"downsample_mode={downsample_mode!r} is not one of {tuple(slices.DOWNSAMPLE_MODES)}. Pass "
                f"downsample_mode='16x' (the released models') or '4x' (no window merger)."
            )
        config: Any = tower.config
        p, n = int(config.patch_size), len(tower.encoder.layers)
        window = tuple(int(k) for k in getattr(config, "window_kernel_size", (2, 2)))
        insert = int(config.insert_layer_id)
        if window != (2, 2) or not 0 <= insert < n:
            raise ValueError(
                f"the tower has window_kernel_size={window} and insert_layer_id={insert} ({n} layers); MiniCPM-V's "
                f"processor counts tokens for a 2 x 2 window merger after one of its layers. Use a tower with "
                f"window_kernel_size=(2, 2) and 0 <= insert_layer_id < {n} (the released models')."
            )
        super().__init__(
            tower,
            image_size=(p, p),
            patch_size=(p, p),
            hidden_size=int(config.hidden_size),
            num_layers=n,
            num_prefix_tokens=0,
            mean=MINICPM_V_MEAN if mean is None else mean,
            std=MINICPM_V_STD if std is None else std,
            layer=layer,
        )
        if resolve_layer(layer, n) != n:
            raise ValueError(
                f"layer={layer}; MiniCPM-V reads its tower's output (after the window merger and the final "
                f"LayerNorm), which is layer=-1. Pass layer=-1."
            )
        self.downsample_mode, self.insert_layer_id = downsample_mode, insert

    @property
    def merges(self) -> bool:
        """Whether the window merger runs (``downsample_mode="16x"``)."""
        return self.downsample_mode == "16x"

    def _set_grad_checkpointing(self, enable: bool) -> None:
        pass  # self.grad_checkpointing is read in _run: the layers run there, not in the tower's forward

    def features(self, pixels: torch.Tensor, layer=None, *, prefix: bool = False) -> torch.Tensor:
        """``(N, 3, h, w)`` normalized views of one size -> ``(N, t, D)`` (see the class docs; the tower has no
        prefix tokens, so ``prefix`` changes nothing)."""
        return self.features_packed([pixels], layer)[0]

    @public(name=class_name(".features_packed"))
    def features_packed(
        self, stacks: list[torch.Tensor], layer: int | None = None, *, pixels: bool = False
    ) -> list[torch.Tensor]:
        """Every view of every stack ``[(S_i, 3, h_i, w_i)]`` (normalized; sides multiples of ``2p``, of ``p``
        for ``"4x"``) in ONE packed pass, attention per view -> ``[(S_i, t_i, D)]`` (see the class docs).

        ``pixels=True``: the stacks are pixels (uint8 ``[0, 255]`` or ``[0, 1]`` floats), each normalized
        (:meth:`normalize`) right before its patch convolution (the runner's path; the same values as
        normalizing first). Without autograd the pass keeps only what the next step reads (see
        :meth:`_run_lean`); with it, the tower's modules run as the model composes them (:meth:`_run`)."""
        if not isinstance(stacks, (list, tuple)) or not stacks:
            raise TypeError(
                f"stacks={type(stacks).__name__}; expected a non-empty list of (S, 3, h, w) tensors. "
                "Pass e.g. [x] for one stack of views of one size."
            )
        unit = self.patch_size[0] * (2 if self.merges else 1)
        for i, s in enumerate(stacks):
            if not isinstance(s, torch.Tensor) or not (s.is_floating_point() or (pixels and s.dtype == torch.uint8)):
                got = s.dtype if isinstance(s, torch.Tensor) else type(s).__name__
                raise TypeError(f"stacks[{i}] is {got}; expected normalized float pixels. Pass bb.normalize(x).")
            if s.ndim != 4 or s.shape[1] != 3 or s.shape[-2] % unit or s.shape[-1] % unit or min(s.shape[-2:]) < 1:
                raise ValueError(
                    f"stacks[{i}] has shape {tuple(s.shape)}; expected (S, 3, h, w) with h and w positive multiples "
                    f"of {unit} (whole 2 x 2 windows of {self.patch_size[0]} px patches). Resize the views first."
                )
        k = resolve_layer(self.layer if layer is None else layer, self.num_layers)
        if k != self.num_layers:
            raise ValueError(f"layer={layer}; MiniCPM-V's tower is read at its output. Pass layer=-1.")
        if not torch.is_grad_enabled():
            return self._run_lean([s.to(self.device) for s in stacks], normalize=pixels)
        if pixels:
            stacks = [self.normalize(s.to(self.device)) for s in stacks]
        return self._run([s.to(self.device, self.dtype) for s in stacks])

    def _run(self, stacks: list[torch.Tensor]) -> list[torch.Tensor]:
        """The reference pass (autograd's): the tower's modules composed as the model composes them."""
        tower = self.model
        emb = tower.embeddings
        side = int(emb.num_patches_per_side)
        xs, blocks, start = [], [], 0
        for s in stacks:  # one patch convolution per view size (the model's, on unpacked views)
            e = emb.patch_embedding(s.to(emb.patch_embedding.weight.dtype))  # (S, D, gh, gw)
            n, d, gh, gw = e.shape
            pos = emb.position_embedding(_position_ids(gh, gw, side, e.device))  # (gh*gw, D)
            xs.append((e.flatten(2).transpose(1, 2) + pos).reshape(n * gh * gw, d))
            blocks.append((start, n, gh, gw))
            start += n * gh * gw
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        for i, layer in enumerate(tower.encoder.layers):
            x = self._checkpointed(self._layer, layer, x, blocks)
            if self.merges and i == self.insert_layer_id:
                x = self._checkpointed(self._window_merge, tower.vit_merger, x, blocks)
                blocks = _halved(blocks)
        x = tower.post_layernorm(x)
        return [x[b : b + n * gh * gw].view(n, gh * gw, x.shape[-1]) for b, n, gh, gw in blocks]

    @torch.no_grad()
    def _run_lean(self, stacks: list[torch.Tensor], normalize: bool = False) -> list[torch.Tensor]:
        """:meth:`_run` without autograd, bit for bit, holding only what the next operation reads.

        The reference keeps, at the GELU of the MLP before the merger (the pass's peak: the most tokens, the
        widest tensors), the layer's input, the residual after attention, the normed MLP input and two ``(N,
        I)`` MLP intermediates alive (``I`` the MLP's width) -- as the model's own pass does -- plus here the
        packed input's pieces. This pass writes the patch embeddings into one ``(N, D)`` buffer (each stack
        normalized, convolved and dropped in turn), adds each residual in place, drops each normed input once
        read, writes the attention calls' outputs into one buffer and applies the GELUs in place: its peak is
        ``fc1`` of that MLP, with the sequence, the normed input and one ``(N, I)`` buffer alive (about half
        the reference's). Every value is computed by the same kernels on the same operands (in-place and
        out-of-place forms, and ``a + b`` as ``b + a``, give the same bits)."""
        tower = self.model
        emb = tower.embeddings
        conv, side = emb.patch_embedding, int(emb.num_patches_per_side)
        blocks, start = [], 0
        for s in stacks:
            gh, gw = s.shape[-2] // self.patch_size[0], s.shape[-1] // self.patch_size[1]
            blocks.append((start, int(s.shape[0]), gh, gw))
            start += s.shape[0] * gh * gw
        x = torch.empty(start, self.hidden_size, dtype=conv.weight.dtype, device=conv.weight.device)
        for s, (b, n, gh, gw) in zip(stacks, blocks):  # one patch convolution per view size, as in _run
            v = (self.normalize(s) if normalize else s).to(self.dtype).to(conv.weight.dtype)
            e = conv(v)  # (S, D, gh, gw)
            del v  # the stack's float pixels: read once
            pos = emb.position_embedding(_position_ids(gh, gw, side, e.device))
            torch.add(e.flatten(2).transpose(1, 2), pos, out=x[b : b + n * gh * gw].view(n, gh * gw, -1))
            del e
        for i, layer in enumerate(tower.encoder.layers):
            groups = [(b, n, gh * gw) for b, n, gh, gw in blocks]
            x.add_(_attention_lean(layer.self_attn, layer.layer_norm1(x), groups))
            x.add_(_mlp_lean(layer.mlp.fc1, layer.mlp.activation_fn, layer.mlp.fc2, layer.layer_norm2(x)))
            if self.merges and i == self.insert_layer_id:
                merger = tower.vit_merger
                order = torch.cat([_window_order(b, n, gh, gw, x.device) for b, n, gh, gw in blocks])
                h = _attention_lean(merger.self_attn, merger.layer_norm1(x)[order], [(0, start // 4, 4)])
                h.add_(x[order])  # x[order] + attention, as the model adds them
                del x
                d = h.shape[-1]
                mean = h.view(-1, 4, d).mean(dim=1)  # each window's four features: the MLP's residual
                h = merger.pre_norm(h.view(-1, 4 * d))  # the windows' features are dropped as it returns
                # h stays alive through this MLP: N / 4 rows of 4 I (the (N, I) of the block above) and the
                # (N, D) norm, less than the block's MLP holds (the sequence, its norm and (N, I))
                x = _mlp_lean(merger.linear_1, merger.act, merger.linear_2, h)
                del h
                x.add_(mean)
                del mean
                blocks, start = _halved(blocks), start // 4
        x = tower.post_layernorm(x)
        return [x[b : b + n * gh * gw].view(n, gh * gw, x.shape[-1]) for b, n, gh, gw in blocks]

    def _checkpointed(self, fn, module, x, blocks):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, module, x, blocks, use_reentrant=False)
        return fn(module, x, blocks)

    @staticmethod
    def _attention(attn, h: torch.Tensor, groups) -> torch.Tensor:
        """The tower's attention on packed ``(N, D)`` tokens, per sequence: ``groups`` are ``(start, sequences,
        tokens each)``, one SDPA call per group (its sequences are the batch of the call)."""
        N, heads = h.shape[0], int(attn.num_heads)
        q, k, v = (proj(h).view(N, heads, -1) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        dropout = float(attn.attention_dropout) if attn.training else 0.0
        out = []
        for b, n, t in groups:
            qb, kb, vb = (y[b : b + n * t].view(n, t, heads, -1).transpose(1, 2) for y in (q, k, v))
            o = nn.functional.scaled_dot_product_attention(qb, kb, vb, dropout_p=dropout, scale=attn.scaling)
            out.append(o.transpose(1, 2).reshape(n * t, -1))
        return attn.out_proj(out[0] if len(out) == 1 else torch.cat(out))

    @classmethod
    def _layer(cls, layer, x: torch.Tensor, blocks) -> torch.Tensor:
        """One SigLIP encoder layer on the packed sequence, attention per view."""
        groups = [(b, n, gh * gw) for b, n, gh, gw in blocks]
        x = x + cls._attention(layer.self_attn, layer.layer_norm1(x), groups)
        return x + layer.mlp(layer.layer_norm2(x))

    @classmethod
    def _window_merge(cls, merger, x: torch.Tensor, blocks) -> torch.Tensor:
        """The tower's ``vit_merger``: attention within each 2 x 2 window (one call for every window of the
        batch), then each window's four features -> one (an MLP of their concatenation plus their mean)."""
        order = torch.cat([_window_order(b, n, gh, gw, x.device) for b, n, gh, gw in blocks])
        h = merger.layer_norm1(x)[order]
        h = x[order] + cls._attention(merger.self_attn, h, [(0, h.shape[0] // 4, 4)])
        patch = h.view(-1, 4, h.shape[-1])
        out = merger.linear_2(merger.act(merger.linear_1(merger.pre_norm(patch.flatten(1)))))
        return out + patch.mean(dim=1)


def _attention_lean(attn, h: torch.Tensor, groups) -> torch.Tensor:
    """:meth:`MiniCPMVBackbone._attention` without autograd: ``h`` is dropped once projected (freed then when
    the call was its last reference), q, k and v before the output projection, and the SDPA outputs of several
    groups are written into one ``(N, D)`` buffer (the reference reshapes each into a copy, then joins them).
    One group (the window merger's) needs no buffer: its output is read as it is (a view where SDPA writes
    it token-major, as on CPU)."""
    N, heads = h.shape[0], int(attn.num_heads)
    q, k, v = (proj(h).view(N, heads, -1) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    del h
    dropout = float(attn.attention_dropout) if attn.training else 0.0
    if len(groups) == 1:
        o = _sdpa(q, k, v, *groups[0], dropout=dropout, scale=attn.scaling)
        del q, k, v
        return attn.out_proj(o.transpose(1, 2).reshape(N, -1))
    out = q.new_empty(N, heads * q.shape[-1])
    for b, n, t in groups:
        o = _sdpa(q, k, v, b, n, t, dropout=dropout, scale=attn.scaling)
        out[b : b + n * t].view(n, t, heads, -1).copy_(o.transpose(1, 2))
        del o
    del q, k, v
    return attn.out_proj(out)


def _sdpa(q, k, v, b: int, n: int, t: int, *, dropout: float, scale: float) -> torch.Tensor:
    """SDPA of the ``n`` sequences of ``t`` tokens from row ``b`` of packed ``(N, heads, d)`` q, k, v ->
    ``(n, heads, t, d)``: the reference's call on the same views."""
    qb, kb, vb = (y[b : b + n * t].view(n, t, q.shape[1], -1).transpose(1, 2) for y in (q, k, v))
    return nn.functional.scaled_dot_product_attention(qb, kb, vb, dropout_p=dropout, scale=scale)


def _mlp_lean(fc1: nn.Module, act, fc2: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``fc2(act(fc1(h)))`` without autograd: ``h`` is dropped once ``fc1`` has read it (freed then when the
    call was its last reference), and a tanh / exact GELU runs in place (the same kernel as out of place)."""
    y = fc1(h)
    del h
    inplace = _inplace_gelu(act)
    y = act(y) if inplace is None else inplace(y)
    return fc2(y)


def _inplace_gelu(act):
    """``act``'s in-place form when it is a GELU whose out-of-place call is ``F.gelu(x, approximate=a)``
    (``nn.GELU``, transformers' ``GELUTanh`` / ``gelu_pytorch_tanh``); else ``None`` (``act`` runs as it is)."""
    if type(act) is nn.GELU:
        approximate = act.approximate
    elif type(act).__name__ in ("GELUTanh", "PytorchGELUTanh") and isinstance(getattr(act, "act", None), partial):
        fn = act.act
        if fn.func is not nn.functional.gelu or fn.args or set(fn.keywords) != {"approximate"}:
            return None
        approximate = fn.keywords["approximate"]
    else:
        return None
    return lambda x: torch.ops.aten.gelu_(x, approximate=approximate)


def _window_order(start: int, n: int, gh: int, gw: int, device) -> torch.Tensor:
    """Indices of ``n`` raster ``(gh, gw)`` maps from ``start``, window by window (2 x 2, raster within and
    between windows): the order of the tower's window merger."""
    idx = torch.arange(n * gh * gw, device=device).view(n, gh // 2, 2, gw // 2, 2)
    return idx.permute(0, 1, 3, 2, 4).flatten() + start


def _halved(blocks):
    out, start = [], 0
    for _, n, gh, gw in blocks:
        out.append((start, n, gh // 2, gw // 2))
        start += n * (gh // 2) * (gw // 2)
    return out


# --- the projector ----------------------------------------------------------------------------------------------
class MergerProjector(nn.Module):
    """MiniCPM-V's ``merger`` as a per-token map of the ``minicpm_v`` recipe's tokens: ``(..., 4 D)`` ->
    ``(..., D_llm)``, the model's ``DownsampleMLP`` on each 2 x 2 cell (the recipe's tokens are the cells, in the
    merger's patch-major order). One merge round (``merger_times=1``, the released models') is reproduced."""

    merger: Any  # a transformers module: its attributes are the model's, not nn.Module's

    @public(name="MergerProjector")
    def __init__(self, merger: Any) -> None:
        super().__init__()
        mlps, size = getattr(merger, "mlp", None), getattr(merger, "merge_kernel_size", None)
        if not isinstance(merger, nn.Module) or not isinstance(mlps, nn.ModuleList) or size is None:
            raise TypeError(
                f"merger={type(merger).__name__}; expected MiniCPM-V's merger (merge_kernel_size, mlp). Pass "
                f"model.model.merger of a MiniCPMV4_6ForConditionalGeneration / MiniCPMV4_7ForConditionalGeneration."
            )
        kernel, rounds = tuple(int(k) for k in size), len(mlps)
        if kernel != (2, 2) or rounds != 1:
            raise ValueError(
                f"the merger has merge_kernel_size={kernel} and merger_times={rounds}; the minicpm_v recipe's tokens "
                f"are 2 x 2 cells merged once (MiniCPM-V's processor counts tokens for that). Use a model with "
                f"merge_kernel_size=(2, 2) and merger_times=1 (the released models')."
            )
        self.merger = merger

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merger.mlp[0](x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)


def _token_map(project):
    """``project`` as a per-token map: MiniCPM-V's merger wrapped."""
    if (
        isinstance(project, nn.Module)
        and not isinstance(project, MergerProjector)
        and hasattr(project, "merge_kernel_size")
    ):
        return MergerProjector(project)
    return project


# --- the front end ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MiniCPMVPlan(ViewPlan):
    """One image: the ``source`` view's ``(h, w)``, ``refine`` (the size cut into ``geometry.grid`` slices, or
    ``None`` without slices), ``slice`` ``(sh, sw)`` (``None``), and ``source_map`` / ``slice_map`` ``(rows,
    cols)`` of tokens; the views are the source, the slices, then (``dcm=True``) their strided views."""

    source: tuple[int, int]
    refine: tuple[int, int] | None
    slice: tuple[int, int] | None
    source_map: tuple[int, int]
    slice_map: tuple[int, int] | None
    strided: bool = False


def _marker(name: str):
    return (name, 1, (1, 0), True)  # a one-token run that is all slot: a (1, 0) map with its newline


class MiniCPMVFrontEnd(FrontEnd[MiniCPMVPlan]):
    """MiniCPM-V's source image and slices (see :mod:`hrperc.recipes.minicpm_v`)."""

    def __init__(
        self,
        tile_size,
        patch_size,
        *,
        scale_resolution: int = slices.MINICPM_V_SCALE_RESOLUTION,
        max_slice_nums: int = slices.MINICPM_V_MAX_SLICE_NUMS,
        slice_mode: bool = True,
        downsample_mode: str = "16x",
        dcm: bool = False,
    ) -> None:
        super().__init__(None, patch_size)  # no fixed tile: every image has its own view sizes
        self.scale_resolution = as_int(scale_resolution, "scale_resolution", example="scale_resolution=448")
        self.max_slice_nums = as_int(max_slice_nums, "max_slice_nums", example="max_slice_nums=9")
        self.slice_mode, self.uses_dem = as_bool(slice_mode, "slice_mode"), as_bool(dcm, "dcm")
        self.downsample_mode = downsample_mode
        slices.slice_plan((64, 64), **self._sizing())  # the options, checked once here

    def _sizing(self) -> dict:
        return dict(
            scale_resolution=self.scale_resolution,
            max_slice_nums=self.max_slice_nums,
            patch_size=self.patch_size[0],
            downsample_mode=self.downsample_mode,
            slice_mode=self.slice_mode,
        )

    def plan(self, image_size) -> MiniCPMVPlan:
        sp = slices.slice_plan(image_size, **self._sizing())
        shapes = {"source": sp.source_map, "slice": sp.slice_map}
        runs = [(name, n, shapes[name]) if name in shapes else _marker(name) for name, n in slices.text_runs(sp)]
        canvas = sp.refine if sp.refine is not None else sp.source
        geo = CropGeometry(tuple(image_size), sp.grid or (1, 1), sp.slice or sp.source, canvas, (0, 0, *canvas))
        views = 1 + sp.num_slices * (1 + self.uses_dem)
        strided = self.uses_dem and sp.grid is not None
        return MiniCPMVPlan(
            tuple(image_size), views, geo, make_layout(*runs), sp.source, sp.refine, sp.slice, sp.source_map,
            sp.slice_map, strided,
        )  # fmt: skip

    def views(self, pixels: torch.Tensor, plan: MiniCPMVPlan):
        b = pixels.shape[0]
        source = pp.resize(pixels, plan.source)[:, None]  # uint8 stays uint8: the processor's rounding
        if plan.refine is None:
            return (source,)
        refined = pp.resize(pixels, plan.refine)
        parts: tuple[torch.Tensor, ...] = (source, local_crop(refined, plan.grid).unflatten(0, (b, -1)))
        if plan.strided:
            parts += (stride_crop(refined, plan.grid).unflatten(0, (b, -1)),)
        return parts

    def token_width(self, width: int) -> int:
        return 4 * width  # a token is a 2 x 2 cell of the tower's map

    def patch_grids(self, plan: MiniCPMVPlan) -> list[list[int]]:
        """``[[h / p, w / p], ...]``: the patch grid of the source view, then of every slice -- the model's
        ``target_sizes`` rows of the image (its processor's), which its LLM's positions may read (4.7)."""
        p = self.patch_size[0]
        grids = [[plan.source[0] // p, plan.source[1] // p]]
        if plan.slice is not None:
            grids += [[plan.slice[0] // p, plan.slice[1] // p]] * plan.geometry.num_tiles
        return grids

    def assemble(self, feats, plan: MiniCPMVPlan, *, project=None):
        b = feats[0].shape[0]
        project = _token_map(project)
        rows, cols = plan.source_map
        cells = [_cells(feats[0][:, 0], rows, cols).flatten(1, 2)]
        if plan.refine is not None and plan.slice_map is not None:
            (sr, sc), n = plan.slice_map, plan.geometry.num_tiles
            tiles = feats[1].flatten(0, 1)  # (b * n, t, D)
            if plan.strided:  # the DEM's output takes the slices' map's place: the same cells, the same count
                tiles, strided = self.in_dem_dtype(tiles), self.in_dem_dtype(feats[2].flatten(0, 1))
                fmap = self.held_dem()(tiles, strided, plan.grid, tile_size=(2 * sr, 2 * sc))
                fmap = fmap.view(b, plan.grid[0] * 2 * sr, plan.grid[1] * 2 * sc, -1)
                tiles = local_crop(fmap, plan.grid, layout="nhwc")
            cells.append(_cells(tiles, sr, sc).view(b, n * sr * sc, -1))
        if self.uses_dem:
            cells = [c.to(cells[-1].dtype) for c in cells]
        x = cells[0] if len(cells) == 1 else torch.cat(cells, dim=1)
        if project is not None:
            x = project(x)
        out = x.new_zeros(b, plan.num_tokens, x.shape[-1])  # the markers' slots stay zeros
        out[:, ~slot_mask(plan.layout).to(out.device)] = x
        return out

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, scale_resolution={self.scale_resolution}, max_slice_nums={self.max_slice_nums}, "
            f"slice_mode={self.slice_mode}, downsample_mode={self.downsample_mode!r}, dcm={self.uses_dem}"
        )


def _cells(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``(B, (2 rows) * (2 cols), D)`` raster features (or a ``(B, 2 rows, 2 cols, D)`` map) -> ``(B, rows, cols,
    4 D)``: each 2 x 2 cell on the channels, patch-major (the merger's order)."""
    return x.reshape(x.shape[0], rows, 2, cols, 2, x.shape[-1]).permute(0, 1, 3, 2, 4, 5).flatten(3)


@register_recipe("minicpm_v", front_end=MiniCPMVFrontEnd, defaults={"layer": -1})
def build_minicpm_v(backbone, **options):
    """MiniCPM-V's front end around its vision tower (see the module docs for the options)."""
    own, enc = split_options("minicpm_v", options)
    mode = own.get("downsample_mode", "16x")
    if isinstance(backbone, MiniCPMVBackbone):
        bb = backbone
        if bb.downsample_mode != mode:  # the same tower, read with the window merger on or off
            bb = MiniCPMVBackbone(bb.model, layer=bb.layer, mean=bb.mean, std=bb.std, downsample_mode=mode)
    else:
        bb = MiniCPMVBackbone(backbone, layer=enc["layer"], downsample_mode=mode)
    return build(MiniCPMVFrontEnd(None, bb.patch_size, **own), bb, enc)
