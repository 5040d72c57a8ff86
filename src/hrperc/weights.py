"""Loading weight files safely, and checking a state dict against the keys a module expects.

Weights come from a ``.safetensors`` file, a torch pickle (``.pt``/``.bin``/``.pth``), or a state
dict already in memory. Pickles are opened with ``torch.load(weights_only=True)``: arbitrary objects
are never unpickled unless the caller passes ``allow_pickle=True``.

Example::

    >>> import torch
    >>> from hrperc.weights import load_state_dict, select_prefixed
    >>> sd = load_state_dict({"model.spatial_embed.ln_fuse.weight": torch.ones(4), "lm_head.weight": torch.ones(2)})
    >>> sorted(select_prefixed(sd, "spatial_embed.", "demo"))
    ['ln_fuse.weight']
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch

__all__ = ["load_state_dict", "select_prefixed", "check_state_dict"]

StateDictOrPath = Mapping[str, torch.Tensor] | str | os.PathLike


def load_state_dict(source: StateDictOrPath, *, allow_pickle: bool = False, fn: str = "load_state_dict"):
    """Return ``{key: tensor}`` from a state dict or a weight file (safetensors or a torch pickle).

    ``source`` may be a mapping (returned as a plain dict), a path to a ``.safetensors`` file, or a
    path to a torch file loaded with ``weights_only=True`` (``allow_pickle=True`` turns that off, for
    trusted files only). A ``{"state_dict": {...}}`` or ``{"model": {...}}`` wrapper is unwrapped.

    Example::

        >>> load_state_dict({"w": torch.zeros(2)})["w"].shape
        torch.Size([2])
    """
    if isinstance(source, Mapping):
        sd = dict(source)
    elif isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{fn}: weight file {path!r} does not exist. Pass a state dict or an existing path."
            )
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
            except Exception as exc:  # torch raises UnpicklingError subclasses that vary by version
                if allow_pickle:
                    raise
                raise ValueError(
                    f"{fn}: {path!r} could not be read with torch.load(weights_only=True) ({exc}). If you trust the "
                    "file, pass allow_pickle=True; better, convert it to .safetensors."
                ) from exc
    else:
        raise TypeError(
            f"{fn}: expected a state dict (mapping of str -> Tensor) or a file path, got {type(source).__name__}."
        )
    for wrapper in ("state_dict", "model"):
        if wrapper in sd and isinstance(sd[wrapper], Mapping) and len(sd) <= 3:
            sd = dict(sd[wrapper])
            break
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(
            f"{fn}: entries {bad[:5]} are not tensors ({type(sd[bad[0]]).__name__} for {bad[0]!r}); a state dict maps "
            "names to tensors. Pass model.state_dict(), or drop the non-tensor entries first."
        )
    return sd


def select_prefixed(sd: Mapping[str, torch.Tensor], marker: str, fn: str) -> dict[str, torch.Tensor]:
    """Keys containing ``marker`` (e.g. ``"spatial_embed."``), with everything up to it removed.

    A full checkpoint names a submodule with some outer prefix (``model.spatial_embed.ln_fuse.weight``);
    this keeps only that submodule's keys. Keys without the marker are returned unchanged only when
    *no* key has it (a bare submodule state dict); otherwise they belong to other modules and are dropped.
    """
    hits = {k[k.index(marker) + len(marker) :]: v for k, v in sd.items() if marker in k}
    if hits:
        return hits
    return dict(sd)


def check_state_dict(sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], fn: str, hint: str = ""):
    """Raise one ``ValueError`` listing missing keys, unexpected keys and shape mismatches, or return None."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs module {tuple(expected[k])}"
        for k in sorted(set(sd) & set(expected))
        if tuple(sd[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches [{'; '.join(mismatched[:6])}]")
    if problems:
        raise ValueError(f"{fn}: the state dict does not fit: {', '.join(problems)}. {hint}".rstrip())


def _short(keys: Iterable[str], n: int = 8) -> str:
    keys = list(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return str(keys[:n])[:-1] + more + "]"
