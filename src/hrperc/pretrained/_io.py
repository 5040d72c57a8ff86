"""Loading weight files safely, and checking a state dict against the keys a module expects.

Weights come from a ``.safetensors`` file, a torch pickle (``.pt``/``.bin``/``.pth``), a directory of
checkpoint shards (``save_pretrained`` output: ``*.safetensors`` or ``pytorch_model*.bin``, with or
without the ``*.index.json`` weight map), or a state dict already in memory. Pickles are opened with
``torch.load(weights_only=True)``: arbitrary objects are never unpickled unless the caller passes
``allow_pickle=True``. ``keep=`` selects keys before tensors are read, so taking a small submodule
out of a large sharded checkpoint reads only the shards (and, for safetensors, only the tensors)
that hold it.

Example::

    >>> import torch
    >>> from hrperc.pretrained._io import load_state_dict, select_prefixed
    >>> sd = load_state_dict({"model.spatial_embed.ln_fuse.weight": torch.ones(4), "lm_head.weight": torch.ones(2)})
    >>> sorted(select_prefixed(sd, "spatial_embed.", "demo"))
    ['ln_fuse.weight']
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

__all__ = ["load_state_dict", "select_prefixed", "check_state_dict"]

StateDictOrPath = Mapping[str, torch.Tensor] | str | os.PathLike


def load_state_dict(source: StateDictOrPath, *, allow_pickle: bool = False, fn: str = "load_state_dict",
                    keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Return ``{key: tensor}`` from a state dict, a weight file or a directory of shards.

    ``source`` may be a mapping (returned as a plain dict), a ``.safetensors`` file, a torch file loaded
    with ``weights_only=True`` (``allow_pickle=True`` turns that off, for trusted files only), or a
    directory holding ``*.safetensors`` or ``pytorch_model*.bin`` shards. A ``{"state_dict": {...}}``
    or ``{"model": {...}}`` wrapper is unwrapped. ``keep(key)``, when given, selects the keys to return;
    from safetensors files and indexed shard directories only those are read.

    Example::

        >>> load_state_dict({"w": torch.zeros(2), "b": torch.ones(1)}, keep=lambda k: k == "w")["w"].shape
        torch.Size([2])
    """
    if isinstance(source, Mapping):
        sd = dict(source)
    elif isinstance(source, str | os.PathLike):
        path = Path(os.fspath(source)).expanduser()
        if path.is_dir():
            sd = _load_directory(path, allow_pickle, fn, keep)
        elif path.is_file():
            sd = _load_file(path, allow_pickle, fn, keep)
        else:
            raise FileNotFoundError(
                f"{fn}: weight file {str(path)!r} does not exist. Pass a state dict, a weight file or a directory of "
                "checkpoint shards."
            )
    else:
        raise TypeError(
            f"{fn}: expected a state dict (mapping of str -> Tensor), a file path or a directory, got "
            f"{type(source).__name__}."
        )
    for wrapper in ("state_dict", "model"):
        if wrapper in sd and isinstance(sd[wrapper], Mapping) and len(sd) <= 3:
            sd = dict(sd[wrapper])
            break
    if keep is not None:
        sd = {k: v for k, v in sd.items() if keep(k)}
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(
            f"{fn}: entries {bad[:5]} are not tensors ({type(sd[bad[0]]).__name__} for {bad[0]!r}); a state dict maps "
            "names to tensors. Pass model.state_dict(), or drop the non-tensor entries first."
        )
    return sd


def _load_file(path: Path, allow_pickle: bool, fn: str, keep) -> dict:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as exc:  # torch raises UnpicklingError subclasses that vary by version
        if allow_pickle:
            raise
        raise ValueError(
            f"{fn}: {str(path)!r} could not be read with torch.load(weights_only=True) ({exc}). If you trust the "
            "file, pass allow_pickle=True; better, convert it to .safetensors."
        ) from exc


def _load_directory(folder: Path, allow_pickle: bool, fn: str, keep) -> dict:
    """A ``save_pretrained`` directory: the shards its index names (only those holding kept keys), else
    every ``*.safetensors`` file, else every ``pytorch_model*.bin`` / ``*.pt`` / ``*.pth`` file."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            shards = sorted({f for k, f in weight_map.items() if keep is None or keep(k)})
            break
    else:
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        if not shards:
            shards = sorted(p.name for ext in ("bin", "pt", "pth") for p in folder.glob(f"*.{ext}"))
        if not shards:
            raise FileNotFoundError(
                f"{fn}: directory {str(folder)!r} holds no checkpoint (no *.safetensors, pytorch_model*.bin or "
                "*.index.json). Pass the folder save_pretrained wrote, or a weight file."
            )
    sd: dict = {}
    for name in shards:
        sd.update(_load_file(folder / name, allow_pickle, fn, keep))
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
