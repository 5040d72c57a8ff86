"""The one interface every ViT family is adapted to: :class:`VisionBackbone`.

A backbone turns a stack of normalized tiles of its native size into patch tokens of one transformer
layer, prefix (class / register) tokens removed::

    pixels (N, 3, h, w)  --features(pixels, layer)-->  tokens (N, ht*wt, D),  (ht, wt) = (h // p, w // p)

Views of other sizes: :meth:`VisionBackbone.accepts` says whether ``features`` runs a view of ``(h, w)``
pixels -- the native ``image_size`` always; other sizes only for a model that resizes its position
embeddings (``dynamic_size``: a timm ViT built with ``dynamic_img_size=True``, a transformers CLIP /
SigLIP / InternVL tower), and then whole multiples of the patch only.

Layers are numbered like Hugging Face's ``hidden_states``: layer ``k`` (1..L) is the output of the
``k``-th transformer block, before any final norm; negative numbers count from the end, so ``-1`` is
the last block and ``-2`` (LLaVA's choice, the default) the second-to-last.

Several layers, as transformers' LLaVA models read a list ``vision_feature_layer``: ``layer=[-2, -5, -8]``
gives each layer's tokens concatenated on the channels in the order given, ``(N, ht*wt, 3*D)``, from one
pass of the tower up to the deepest of them (:attr:`VisionBackbone.reads_layers`: the timm, open_clip and
transformers adapters). ``prefix=True`` keeps the prefix tokens too, first (transformers'
``vision_feature_select_strategy="full"``: CLIP's class token), ``(N, P + ht*wt, D)``.

Example::

    >>> import torch, hrperc
    >>> from timm.models.vision_transformer import VisionTransformer
    >>> vit = VisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2)
    >>> bb = hrperc.wrap_backbone(vit)
    >>> bb.features(bb.normalize(torch.rand(5, 3, 28, 28))).shape
    torch.Size([5, 4, 32])
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .._errors import public

__all__ = ["VisionBackbone", "resolve_layer", "resolve_layers", "layer_value", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resolve_layer(layer, num_layers: int) -> int:
    """``layer`` (1..L or -L..-1) -> how many blocks to run, ``k`` in 1..L."""
    if not isinstance(layer, numbers.Integral) or isinstance(layer, bool):
        raise TypeError(f"layer={layer!r}; expected an int, e.g. layer=-2 (the second-to-last block).")
    layer = int(layer)
    if layer == 0:
        raise ValueError(
            f"layer=0 is the patch embedding, not a transformer block output. Pass 1..{num_layers} "
            f"or -{num_layers}..-1 (-2 = LLaVA's second-to-last layer)."
        )
    if not -num_layers <= layer <= num_layers:
        raise ValueError(
            f"layer={layer} is out of range for this {num_layers}-layer ViT. Pass 1..{num_layers} "
            f"or -{num_layers}..-1 (-2 = LLaVA's second-to-last layer)."
        )
    return layer if layer > 0 else num_layers + 1 + layer


def resolve_layers(layer, num_layers: int) -> tuple[int, ...]:
    """``layer``, one int or a sequence of them (``[-2, -5, -8]``), -> the blocks to read, ``k`` in 1..L each,
    in the order given. A sequence must be non-empty and name each block once (``-2`` and ``L - 1`` are the
    same block)."""
    if not isinstance(layer, (list, tuple)):
        return (resolve_layer(layer, num_layers),)
    example = "layer=[-2, -5, -8] (three layers, concatenated on the channels)"
    if not layer:
        raise ValueError(
            f"layer={list(layer)!r} names no layer. Pass one int, e.g. layer=-2, or a list, e.g. {example}."
        )
    blocks = []
    for entry in layer:
        try:
            blocks.append(resolve_layer(entry, num_layers))
        except (TypeError, ValueError) as e:
            raise type(e)(
                f"layer={list(layer)!r}: entry {entry!r} is not a layer of this {num_layers}-layer tower ({e}) Pass "
                f"ints in 1..{num_layers} or -{num_layers}..-1, e.g. {example}."
            ) from None
    seen: dict[int, object] = {}
    for entry, k in zip(layer, blocks):
        if k in seen:
            raise ValueError(
                f"layer={list(layer)!r} names block {k} twice ({seen[k]!r} and {entry!r}); each layer is read once. "
                f"Drop the repeated entry, e.g. {example}."
            )
        seen[k] = entry
    return tuple(blocks)


def layer_value(layer, num_layers: int) -> int | tuple[int, ...]:
    """``layer`` checked (:func:`resolve_layers`) and in plain form: an int, or a tuple of ints as given."""
    resolve_layers(layer, num_layers)
    return tuple(int(v) for v in layer) if isinstance(layer, (list, tuple)) else int(layer)


def _size_pair(size) -> tuple[int, int]:
    """``size`` as ``(h, w)``: two positive ints (a tuple, list or ``torch.Size``)."""
    pair = tuple(size) if isinstance(size, (tuple, list, torch.Size)) else ()
    if len(pair) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"size={size!r}; expected (h, w), two ints in pixels. Pass e.g. size=(336, 336).")
    if min(pair) < 1:
        raise ValueError(f"size={size!r}; both sides must be >= 1 pixel. Pass e.g. size=(336, 336).")
    return int(pair[0]), int(pair[1])


def _as_triple(value, name: str) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except TypeError:
        out = ()
    if len(out) != 3:
        raise ValueError(f"{name}={value!r}; expected three per-channel floats (R, G, B).")
    if name == "std" and min(out) <= 0:
        raise ValueError(f"std={value!r}; every entry must be > 0.")
    return out[0], out[1], out[2]


def class_name(member: str = "") -> Callable[..., str]:
    """The :func:`~hrperc._errors.public` name of a backbone's constructor (``member=""``) or method
    (``member=".features"``): the instance's class, ``TimmBackbone`` or ``HFBackbone.features``, which a static
    name could not say (which adapter, or which user subclass, refused)."""
    return lambda self, *args, **kwargs: type(self).__name__ + member


class VisionBackbone(nn.Module):
    """A ViT adapted to hrperc: native tile size, patch size, width, prefix tokens, normalization.

    Attributes:
        model: the wrapped module (a timm / open_clip / transformers model).
        image_size: native input ``(h, w)``; every tile must have this size.
        patch_size: ``(ph, pw)``.
        grid_size: tokens per tile ``(ht, wt) = (h // ph, w // pw)`` (whole patches; a remainder is unread).
        hidden_size: ``D``.
        num_layers: ``L``, transformer blocks.
        num_prefix_tokens: class + register tokens the model prepends (read off the model).
        mean, std: per-channel normalization of ``[0, 1]`` RGB pixels the weights expect.
        layer: default layer for :meth:`features`.
        source: where the weights came from (a path), or ``None`` for random initialization.
        dynamic_size: whether the model resizes its position embeddings, so that :meth:`features` also
            runs views other than ``image_size`` (whole multiples of the patch; see :meth:`accepts`).

    Subclasses implement ``_patch_tokens(pixels, k) -> (N, ht*wt, D)``, the output of block ``k``
    (1-based) without prefix tokens, and ``_set_grad_checkpointing(enable)``; those that set
    :attr:`reads_layers` also ``_hidden_states(pixels, blocks, prefix) -> [(N, ht*wt, D)]``, the outputs of
    the (sorted, distinct) ``blocks``, their ``P`` prefix tokens first with ``prefix=True``, from one pass up to
    the last of them.
    """

    family = "generic"
    #: Whether :meth:`features` reads several layers at once (``layer=[...]``) and keeps prefix tokens
    #: (``prefix=True``); adapters that implement ``_hidden_states`` set it.
    reads_layers = False
    dynamic_size = False  # adapters set it from the model they wrap
    packs_views = False  # True: features_packed runs views of every size in one call (native-resolution towers)
    model: Any  # another library's module: its attributes are that library's, not nn.Module's

    @public(name=class_name())
    def __init__(
        self,
        model: nn.Module,
        *,
        image_size,
        patch_size,
        hidden_size: int,
        num_layers: int,
        num_prefix_tokens: int,
        mean,
        std,
        layer: int | Sequence[int] = -2,
        source: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.patch_size = (int(patch_size[0]), int(patch_size[1]))
        (h, w), (ph, pw) = self.image_size, self.patch_size
        if min(ph, pw) < 1 or h < ph or w < pw:
            raise ValueError(
                f"image_size {self.image_size} and patch_size {self.patch_size}: the tile must hold at least "
                f"one patch. Check the model's config."
            )
        # A tile that is not a multiple of the patch keeps only whole patches, as the patch convolution
        # does (SigLIP so400m-patch14-384: 27 x 27 patches, the last 6 pixels of each side unread).
        self.grid_size = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.mean = _as_triple(mean, "mean")
        self.std = _as_triple(std, "std")
        self.layer = self.check_layer(layer)
        self.source = source
        self.grad_checkpointing = False

    # --- what subclasses provide -----------------------------------------------------------------
    def _patch_tokens(self, pixels: torch.Tensor, k: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _set_grad_checkpointing(self, enable: bool) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _hidden_states(  # pragma: no cover - abstract
        self, pixels: torch.Tensor, blocks: tuple[int, ...], prefix: bool
    ) -> list[torch.Tensor]:
        raise NotImplementedError

    # --- public ----------------------------------------------------------------------------------
    @property
    def num_patches(self) -> int:
        """Patch tokens per tile, ``ht*wt``."""
        return self.grid_size[0] * self.grid_size[1]

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.model.parameters(), None)
        return p.dtype if p is not None else torch.float32

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def extra_repr(self) -> str:
        return (
            f"family={self.family!r}, image_size={self.image_size}, patch_size={self.patch_size}, "
            f"hidden_size={self.hidden_size}, num_layers={self.num_layers}, "
            f"num_prefix_tokens={self.num_prefix_tokens}, layer={self.layer}, source={self.source!r}"
        )

    def check_layer(self, layer, *, prefix: bool = False) -> int | tuple[int, ...]:
        """``layer`` (one int, or a list of them) checked against this tower, in plain form (an int, or a tuple
        of ints as given). Several layers and ``prefix=True`` need :attr:`reads_layers`."""
        value = layer_value(layer, self.num_layers)
        if not self.reads_layers and (isinstance(value, tuple) or prefix):
            what = f"layer={list(value)!r}" if isinstance(value, tuple) else "prefix=True (the class token kept)"
            raise ValueError(
                f"{what}: this {type(self).__name__} reads one layer's patch tokens only. Pass one int, e.g. "
                f"layer=-1, or use a timm / open_clip / transformers CLIP-SigLIP tower, which read several."
            )
        return value

    def feature_width(self, layer=None) -> int:
        """Channels of :meth:`features` for ``layer`` (default ``self.layer``): ``D`` per layer read."""
        layer = self.layer if layer is None else layer
        return self.hidden_size * (len(layer) if isinstance(layer, (list, tuple)) else 1)

    @public(name=class_name(".accepts"))
    def accepts(self, size) -> bool:
        """Whether :meth:`features` runs views of ``size = (h, w)`` pixels.

        The native :attr:`image_size` always. Another size only when :attr:`dynamic_size` is set (a timm
        ViT built with ``dynamic_img_size=True``; a transformers CLIP / SigLIP / InternVL tower, whose
        position embeddings are interpolated), and then only whole multiples of the patch: such a view
        gives ``(h // ph) * (w // pw)`` tokens. open_clip towers and fixed-size timm ViTs take their
        native size only. ``size`` must be two positive ints (``TypeError`` / ``ValueError`` otherwise).

        Example::

            >>> import hrperc
            >>> from timm.models.vision_transformer import VisionTransformer
            >>> vit = VisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2,
            ...                         dynamic_img_size=True)
            >>> bb = hrperc.wrap_backbone(vit)
            >>> bb.accepts((28, 28)), bb.accepts((42, 56)), bb.accepts((30, 28))
            (True, True, False)
        """
        h, w = _size_pair(size)
        if (h, w) == self.image_size:
            return True
        return bool(self.dynamic_size) and h % self.patch_size[0] == 0 and w % self.patch_size[1] == 0

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (only matters when the backbone is trained)."""
        self._set_grad_checkpointing(bool(enable))
        self.grad_checkpointing = bool(enable)

    @public(name=class_name(".normalize"))
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``[0, 1]`` RGB ``(..., 3, h, w)`` -> ``(x - mean) / std``, computed in float32 (uint8 ``[0, 255]``
        pixels are divided by 255 first)."""
        if not isinstance(images, torch.Tensor):  # the rule features applies to pixels: a TypeError
            raise TypeError(
                f"images must be a torch.Tensor (..., 3, h, w), got {type(images).__name__}. Convert it first, e.g. "
                "torch.as_tensor(images)."
            )
        if images.ndim < 3 or images.shape[-3] != 3:
            raise ValueError(
                f"images have shape {tuple(images.shape)}; expected 3 RGB "
                f"channels at dim -3. Convert grayscale/RGBA images to RGB first."
            )
        mean = torch.tensor(self.mean, device=images.device, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=torch.float32).view(3, 1, 1)
        # One new tensor, the rest in place (an image stack is large: three temporaries cost 10x the time).
        if images.dtype == torch.uint8:  # the image processors' fused form: (x - 255 mean) / (255 std)
            return images.float().sub_(mean * 255.0).div_(std * 255.0)
        return images.float().sub(mean).div_(std)

    @public(name=class_name(".features"))
    def features_packed(self, stacks: list[torch.Tensor], layer=None) -> list[torch.Tensor]:
        """:meth:`features` of several stacks ``[(S_i, 3, h_i, w_i)] -> [(S_i, t_i, D)]``. Here one call per
        stack; a backbone with ``packs_views = True`` (a native-resolution tower, whose attention is per
        image) runs them all in one packed call, and the runner then calls this once per batch."""
        return [self.features(s, layer) for s in stacks]

    def features(self, pixels: torch.Tensor, layer=None, *, prefix: bool = False) -> torch.Tensor:
        """Patch tokens of a layer: ``(N, 3, h, w)`` normalized pixels -> ``(N, ht*wt, D)``.

        ``(h, w)`` is the native :attr:`image_size`, or any size :meth:`accepts` (then ``(ht, wt) =
        (h // ph, w // pw)``). Prefix (class and register) tokens are removed, or kept first with
        ``prefix=True``: ``(N, P + ht*wt, D)``. ``layer`` defaults to ``self.layer``; a list of layers gives
        their tokens concatenated on the channels in its order, ``(N, ht*wt, len(layer) * D)``, from one pass
        up to the deepest. Pixels are cast to the backbone's parameter dtype; the output has that dtype.
        """
        if not isinstance(pixels, torch.Tensor):
            raise TypeError(f"pixels must be a torch.Tensor (N, 3, h, w), got {type(pixels).__name__}.")
        size = tuple(pixels.shape[-2:])
        if pixels.ndim != 4 or pixels.shape[1] != 3 or min(size) < 1 or not self.accepts(size):
            (h, w), (ph, pw) = self.image_size, self.patch_size
            if self.dynamic_size:
                raise ValueError(
                    f"pixels have shape {tuple(pixels.shape)}; expected (N, 3, h, w) with h a multiple of "
                    f"{ph} and w a multiple of {pw} (whole patches), or the native size ({h}, {w}). Resize or "
                    f"crop the views to whole patches."
                )
            raise ValueError(
                f"pixels have shape {tuple(pixels.shape)}; expected (N, 3, {h}, {w}), the backbone's native "
                f"size. Crop with tile_size={self.image_size} (HighResEncoder does this)."
            )
        layer = self.layer if layer is None else layer
        grid = (size[0] // self.patch_size[0], size[1] // self.patch_size[1])
        if not isinstance(layer, (list, tuple)) and not prefix:  # one layer's patch tokens: the adapter's own fast path
            tokens = self._patch_tokens(pixels.to(self.dtype), resolve_layer(layer, self.num_layers))
        else:
            tokens = self._selected(pixels.to(self.dtype), layer, prefix)
        if tokens.shape[1] != grid[0] * grid[1] + (self.num_prefix_tokens if prefix else 0):
            raise RuntimeError(
                f"the {self.family} model returned {tokens.shape[1]} tokens per tile, expected "
                f"{grid[0] * grid[1]} patch tokens ({grid}); its prefix-token count "
                f"({self.num_prefix_tokens}) was misread. Please report this model class."
            )
        return tokens

    def _selected(self, pixels: torch.Tensor, layer, prefix: bool) -> torch.Tensor:
        """Several layers and / or the prefix tokens: one pass (``_hidden_states``) up to the deepest block."""
        self.check_layer(layer, prefix=bool(prefix))
        blocks = resolve_layers(layer, self.num_layers)
        ordered = sorted(blocks)
        states = self._hidden_states(pixels, tuple(ordered), bool(prefix))
        picked = [states[ordered.index(k)] for k in blocks]
        return picked[0] if len(picked) == 1 else torch.cat(picked, dim=-1)
