"""Loading weight files safely, and checking a state dict against the keys a module expects.

Weights come from a safetensors file, a torch file, a directory of checkpoint shards
(``save_pretrained`` output: ``*.safetensors`` or ``pytorch_model*.bin``, with or without the
``*.index.json`` weight map), or a state dict already in memory. A file is routed by its first bytes,
not its name (``hrperc._weights``: a safetensors file named ``.bin`` loads as safetensors); torch files
are opened with ``torch.load(weights_only=True)``, so pickled objects are never executed. ``keep=``
selects keys before tensors are read, so taking a small submodule out of a large sharded checkpoint
reads only the shards (and, for safetensors, only the tensors) that hold it. Wrapped checkpoints
(``{"state_dict": ...}`` as Lightning saves them, ``{"model": ...}``, ``{"module": ...}``) are unwrapped.

Example::

    >>> import torch
    >>> from hrperc.pretrained._io import load_state_dict, select_prefixed
    >>> sd = load_state_dict({"model.spatial_embed.ln_fuse.weight": torch.ones(4), "lm_head.weight": torch.ones(2)})
    >>> sorted(select_prefixed(sd, "spatial_embed."))
    ['ln_fuse.weight']
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from .._errors import public
from .._weights import read_weights, safetensors_header, sniff, unwrap

__all__ = ["load_state_dict", "select_prefixed", "check_state_dict", "check_values", "list_keys"]

StateDictOrPath = Mapping[str, torch.Tensor] | str | os.PathLike


@public
def load_state_dict(
    source: StateDictOrPath, *, allow_pickle: bool = False, keep: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """Return ``{key: tensor}`` from a state dict, a weight file or a directory of shards.

    ``source`` may be a mapping (returned as a plain dict), a safetensors file, a torch file loaded
    with ``weights_only=True`` (the format is read from the file's first bytes, not its name), or a
    directory holding ``*.safetensors`` or ``pytorch_model*.bin`` shards. A ``{"state_dict": {...}}``
    (Lightning), ``{"model": {...}}``, ``{"module": {...}}`` or ``{"model_state_dict": {...}}`` wrapper
    is unwrapped. ``keep(key)``, when given, selects the keys to return; from safetensors files and
    indexed shard directories only those are read. ``allow_pickle=True`` (trusted files only) lets
    ``torch.load`` unpickle arbitrary objects.

    Raises ``FileNotFoundError`` (no such path), ``IsADirectoryError`` / ``FileNotFoundError`` (a
    directory without shards), ``ValueError`` (an empty, truncated, corrupt or pickled file, naming it)
    and ``TypeError`` (entries that are not tensors, naming the wrapper key to use).

    Example::

        >>> load_state_dict({"w": torch.zeros(2), "b": torch.ones(1)}, keep=lambda k: k == "w")["w"].shape
        torch.Size([2])
    """
    if isinstance(source, Mapping):
        sd = dict(source)
    elif isinstance(source, str | os.PathLike):
        path = Path(os.fspath(source)).expanduser()
        if path.is_dir():
            sd = _load_directory(path, allow_pickle, keep)
        elif path.is_file():
            sd = _load_file(path, allow_pickle, keep)
        else:
            raise FileNotFoundError(
                f"weight file {str(path)!r} does not exist. Pass a state dict, a weight file or a directory of "
                "checkpoint shards."
            )
    else:
        raise TypeError(
            f"expected a state dict (mapping of str -> Tensor), a file path or a directory, got "
            f"{type(source).__name__}."
        )
    where = f"{str(source)!r}" if not isinstance(source, Mapping) else "the state dict"
    return unwrap(sd, where=where, keep=keep)


def _load_file(path: Path, allow_pickle: bool, keep) -> dict:
    # a torch file may be wrapped ({"state_dict": ...}): unwrap before selecting keys
    return unwrap(read_weights(path, keep=keep, allow_pickle=allow_pickle), where=repr(str(path)), keep=keep)


def _load_directory(folder: Path, allow_pickle: bool, keep) -> dict:
    """A ``save_pretrained`` directory: the shards its index names (only those holding kept keys), else
    every ``*.safetensors`` file, else every ``pytorch_model*.bin`` / ``*.pt`` / ``*.pth`` file."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = _read_index(index)
            shards = sorted({f for k, f in weight_map.items() if keep is None or keep(k)})
            break
    else:
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        if not shards:
            shards = sorted(p.name for ext in ("bin", "pt", "pth") for p in folder.glob(f"*.{ext}"))
        if not shards:
            raise FileNotFoundError(
                f"directory {str(folder)!r} holds no checkpoint (no *.safetensors, pytorch_model*.bin or "
                "*.index.json). Pass the folder save_pretrained wrote, or a weight file."
            )
    sd: dict = {}
    for name in shards:
        sd.update(_load_file(folder / name, allow_pickle, keep))
    return sd


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    except (ValueError, AttributeError) as exc:
        raise ValueError(
            f"the shard index {str(index)!r} is not a JSON object with a 'weight_map' ({exc}). Check the "
            "download, or delete the index to read every shard in the folder."
        ) from exc
    if not isinstance(weight_map, dict):
        raise ValueError(f"'weight_map' in {str(index)!r} is not a mapping of key -> shard file. Check it.")
    return weight_map


def list_keys(source) -> list[str] | None:
    """The keys a weight file or shard directory holds, read from headers and indexes without loading any
    tensor; ``None`` where that needs loading (torch files) or ``source`` is not a path."""
    if not isinstance(source, str | os.PathLike):
        return None
    path = Path(os.fspath(source)).expanduser()
    if path.is_dir():
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (path / index_name).is_file():
                return sorted(_read_index(path / index_name))
        files = sorted(path.glob("*.safetensors"))
        if not files:
            return None
    elif path.is_file():
        files = [path]
    else:
        return None
    keys: list[str] = []
    for f in files:
        if sniff(f) != "safetensors":
            return None
        keys += safetensors_header(f)
    return sorted(keys)


def select_prefixed(
    sd: Mapping[str, torch.Tensor], marker: str, *, prefix: str | None = None
) -> dict[str, torch.Tensor]:
    """Keys containing ``marker`` (e.g. ``"spatial_embed."``), with everything up to it removed.

    A full checkpoint names a submodule with some outer prefix (``model.spatial_embed.ln_fuse.weight``);
    this keeps only that submodule's keys. Keys without the marker are returned unchanged only when
    *no* key has it (a bare submodule state dict); otherwise they belong to other modules and are dropped.
    Two copies of the submodule under different prefixes (``model.spatial_embed.*`` and
    ``ema.spatial_embed.*``) are refused (``ValueError``, naming both) unless ``prefix`` picks one:
    ``prefix="ema.spatial_embed."`` (or ``"ema."``, the marker is appended) keeps only keys starting with it.
    """
    if prefix is not None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix={prefix!r} is not a string. Pass a key prefix such as 'model.{marker}'.")
        full = prefix if prefix.endswith(marker) else prefix + marker
        hits = {k[len(full) :]: v for k, v in sd.items() if k.startswith(full)}
        if not hits:
            raise ValueError(
                f"prefix={prefix!r}: no key starts with {full!r}; the prefixes present are "
                f"{_short(sorted(_prefixes(sd, marker)))}. Pass one of them, or prefix=None."
            )
        return hits
    groups = _prefixes(sd, marker)
    if len(groups) > 1:
        names = sorted(groups)
        counts = ", ".join(f"{p!r} ({groups[p]} keys)" for p in names[:6])
        raise ValueError(
            f"the checkpoint holds {len(names)} copies of the {marker!r} weights under different prefixes: "
            f"{counts}. Loading both would keep one silently. Pass prefix={names[0]!r} (or another of them) to "
            "choose, e.g. the EMA copy."
        )
    hits = {k[k.index(marker) + len(marker) :]: v for k, v in sd.items() if marker in k}
    if hits:
        return hits
    return dict(sd)


def _prefixes(sd: Mapping, marker: str) -> dict[str, int]:
    """``{outer prefix + marker: number of keys}`` of the keys containing ``marker``."""
    out: dict[str, int] = {}
    for k in sd:
        if marker in k:
            p = k[: k.index(marker) + len(marker)]
            out[p] = out.get(p, 0) + 1
    return out


def check_state_dict(
    sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], *, hint: str = "", values: bool = True
):
    """Raise one ``ValueError`` listing missing keys, unexpected keys and shape mismatches, or return None.

    With ``values=True`` (the default) the tensors must then be floating point (an integer or bool
    tensor is refused rather than cast) and finite (NaN / Inf are refused, naming the tensors and counts).
    """
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
        raise ValueError(f"the state dict does not fit: {', '.join(problems)}. {hint}".rstrip())
    if values:
        check_values(sd)


def check_values(sd: Mapping[str, torch.Tensor]) -> None:
    """Refuse (``ValueError``) tensors that are not floating point, and tensors holding NaN or Inf."""
    not_float = [f"{k} ({str(v.dtype).replace('torch.', '')})" for k, v in sd.items() if not v.is_floating_point()]
    if not_float:
        raise ValueError(
            f"tensors {_short(not_float, 6)} are not floating point; the module's weights are, and casting "
            "integers or bools would change them silently. Check that this is the right checkpoint (not a quantized "
            "or corrupted one); if the values are right, convert them with .float() and pass the state dict."
        )
    bad = []
    for k, v in sd.items():
        n = int((~torch.isfinite(v)).sum()) if v.numel() else 0
        if n:
            bad.append(f"{k} ({n} of {v.numel()})")
    if bad:
        raise ValueError(
            f"tensors {_short(bad, 6)} hold NaN or Inf values: the checkpoint is corrupt or its training "
            "diverged. Use another checkpoint (an earlier one, or the EMA copy through prefix=), or fix those tensors."
        )


def _short(keys: Iterable[str], n: int = 8) -> str:
    keys = list(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return str(keys[:n])[:-1] + more + "]"
