"""``hrperc encode --save tokens.safetensors``: the tokens of every image in one safetensors file.

The file holds, for ``B`` images (in the order given) of at most ``T`` tokens of width ``D``:

=====================  =====================================================================================
``tokens``             ``(B, T, D)``, the encoder's dtype; image ``b``'s tokens are ``tokens[b, :T_b]``, zeros after
``token_mask``         ``(B, T)`` bool, True on real tokens (``T_b`` of them in row ``b``)
``slot_mask``          ``(B, T)`` bool, True on newline slots (LLaVA-NeXT's ``image_newline`` positions: zeros)
``extras.<name>``      the front end's side outputs padded like ``tokens`` (Qwen3-VL's ``deepstack.<k>``), if any
=====================  =====================================================================================

and string metadata (``safe_open(path, "pt").metadata()``), JSON where noted:

=====================  =====================================================================================
``format``             ``"hrperc.tokens"``; ``format_version``: ``"1"``
``hrperc_version``     the version that wrote it
``recipe``             the recipe's name; ``options`` (JSON): the options it was built with (flags included)
``backbone``           ``--backbone``; ``weights``: ``--weights`` or ``""`` (random)
``images`` (JSON)      one object per image, in row order: ``file``, ``image_size`` ``[H, W]``, ``grid``
                       ``[gh, gw]``, ``canvas_size`` ``[h, w]``, ``views`` (ViT inputs), ``num_tokens`` (``T_b``)
                       and ``layout``: the token runs, each ``{"source", "start", "stop", "shape", "newline"}``
                       (``shape``: ``[rows, cols]`` of a map or ``null``; ``newline``: a slot after each row)
=====================  =====================================================================================

:func:`load_tokens` reads it back (``tensors, metadata`` with the JSON entries decoded).

Example::

    >>> import torch, tempfile, pathlib
    >>> from hrperc.modules.frontend import make_layout
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "tokens.safetensors"
    >>> rows = [{"file": "a.png", "tokens": torch.ones(3, 2), "layout": make_layout(("image", 3, (1, 3)))},
    ...         {"file": "b.png", "tokens": torch.ones(1, 2), "layout": make_layout(("image", 1, (1, 1)))}]
    >>> save_tokens(path, rows, {"recipe": "llava15"})
    >>> tensors, meta = load_tokens(path)
    >>> tensors["tokens"].shape, tensors["token_mask"].sum(1).tolist(), meta["images"][1]["num_tokens"]
    (torch.Size([2, 3, 2]), [3, 1], 1)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["check_save_path", "image_record", "save_tokens", "load_tokens"]

FORMAT, FORMAT_VERSION = "hrperc.tokens", "1"
_JSON_KEYS = ("images", "options")


def check_save_path(path) -> None:
    """``--save``: a ``*.safetensors`` file name in a folder that exists and is writable (not a folder),
    checked before any model is built."""
    p = Path(path).expanduser()
    if p.suffix != ".safetensors":
        raise ValueError(
            f"--save {str(path)!r}: the file is written in the safetensors format; pass a name ending in "
            f".safetensors, e.g. --save {p.with_suffix('.safetensors').name}"
        )
    if p.is_dir():
        raise IsADirectoryError(
            f"--save {str(path)!r} is a folder; pass a file name, e.g. --save {p / 'tokens.safetensors'}"
        )
    folder = p.parent
    if not folder.is_dir():
        raise FileNotFoundError(
            f"--save {str(path)!r}: the folder {str(folder)!r} does not exist. Create it, or pass another path."
        )
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"--save {str(path)!r}: the folder {str(folder)!r} is not writable. Pass another path.")


def image_record(path, out, b: int = 0) -> dict[str, Any]:
    """Image ``b`` of an :class:`~hrperc.EncoderOutput` as a row of :func:`save_tokens`: its real tokens
    ``(T_b, D)`` (on the CPU), extras, plan and layout."""
    t = out.num_tokens[b]
    geo, plan = out.geometries[b], (out.plans[b] if out.plans else None)
    return {
        "file": str(path),
        "tokens": out.tokens[b, :t].detach().cpu(),
        "extras": {k: v[b, :t].detach().cpu() for k, v in out.extras.items() if v.dim() >= 2 and v.shape[1] >= t},
        "image_size": list(geo.input_size),
        "grid": list(geo.grid),
        "canvas_size": list(geo.canvas_size),
        "views": None if plan is None else plan.views,
        "layout": out.layout[b],
    }


def _padded(rows: list[torch.Tensor], T: int) -> torch.Tensor:
    out = rows[0].new_zeros(len(rows), T, *rows[0].shape[1:])
    for b, r in enumerate(rows):  # one copy per image at the end of the run, not a hot path
        out[b, : r.shape[0]] = r
    return out


def save_tokens(path, rows: list[dict[str, Any]], metadata: dict[str, Any]) -> None:
    """Write ``rows`` (one dict per image: ``file``, ``tokens`` ``(T_b, D)``, ``layout`` and optionally
    ``extras``, ``image_size``, ``grid``, ``canvas_size``, ``views``) to ``path`` in the format of the module
    docs; ``metadata``: ``recipe``, ``options``, ``backbone``, ``weights``. Written to a temporary file first,
    then renamed, so an interrupted run leaves no half file."""
    from safetensors.torch import save_file

    from .._version import __version__
    from ..modules.frontend import slot_mask

    T = max(r["tokens"].shape[0] for r in rows)
    tensors = {
        "tokens": _padded([r["tokens"] for r in rows], T),
        "token_mask": torch.stack([torch.arange(T) < r["tokens"].shape[0] for r in rows]),
        "slot_mask": torch.stack([slot_mask(r["layout"], T) for r in rows]),
    }
    for name in rows[0].get("extras", {}):
        tensors[f"extras.{name}"] = _padded([r["extras"][name] for r in rows], T)
    images = []
    for r in rows:
        entry = {k: r.get(k) for k in ("file", "image_size", "grid", "canvas_size", "views")}
        entry["num_tokens"] = int(r["tokens"].shape[0])
        entry["layout"] = [
            {
                "source": s.source,
                "start": s.start,
                "stop": s.stop,
                "shape": list(s.shape) if s.shape else None,
                "newline": s.newline,
            }
            for s in r["layout"]
        ]
        images.append(entry)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "hrperc_version": __version__}
    meta.update({k: json.dumps(v) if k in _JSON_KEYS else str(v) for k, v in metadata.items()})
    meta["images"] = json.dumps(images)
    p = Path(path).expanduser()
    tmp = p.with_name(p.name + ".part")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, p)


def load_tokens(path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of a file :func:`save_tokens` wrote, the JSON metadata decoded; a file of
    another format is a ``ValueError`` naming it."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta: dict[str, Any] = dict(f.metadata() or {})
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"{str(path)!r} is not an hrperc tokens file (format={meta.get('format')!r}, expected {FORMAT!r}); "
                f"pass a file written by hrperc encode --save."
            )
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key in _JSON_KEYS:
        if key in meta:
            meta[key] = json.loads(meta[key])
    return tensors, meta
