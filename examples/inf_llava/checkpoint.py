"""Checkpoints of the trained parts and the optimizer, in safetensors, for single-process, DDP and FSDP.

A checkpoint is a directory ``checkpoint-<step>/``::

    model.safetensors      trained parameters only (full, unsharded; keys = the Llava model's parameter names,
                           e.g. hrperc_front_end.front_end.dem.*, model.multi_modal_projector.*, lm_head.weight)
    optimizer.safetensors  AdamW state tensors, keys "<parameter name>/<exp_avg|exp_avg_sq|step>"
    trainer_state.json     step, stage, param-group hyper-parameters, scheduler state, losses, args

Example::

    >>> save_checkpoint(out_dir, model, optimizer, scheduler, step=100, extra={"stage": 1})   # all ranks call
    >>> state = load_checkpoint(latest_checkpoint(out_dir), model, optimizer, scheduler)       # all ranks call

Frozen weights are not saved: they come back from their source (a pretrained directory, or for
``tiny`` the seeded random init). Gathering uses ``torch.distributed.checkpoint.state_dict``, which
understands DDP and FSDP2 wrappers, so the files do not depend on how the run was launched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "load_trained_weights"]

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _writable(tensors: dict) -> dict:
    """``tensors`` as safetensors can write them, copying only what must be copied.

    The gathered state dicts are already fresh host tensors (or, in one CPU process, the parameters
    themselves, which nothing modifies during the synchronous write), so they are written as they
    are: only a non-contiguous tensor is packed, and only a tensor sharing storage with an earlier
    one (tied weights) is cloned, which safetensors would otherwise refuse.
    """
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach()
        if not v.is_contiguous():
            v = v.contiguous()
        elif v.numel():
            key = (v.device, v.untyped_storage().data_ptr())
            if key in seen:
                v = v.clone()
            seen.add(key)
        out[k] = v
    return out


def save_checkpoint(out_dir, model, optimizer, scheduler, step: int, extra: dict | None = None) -> Path:
    """Write ``out_dir/checkpoint-<step>`` (collective: every rank must call; rank 0 writes).

    Host memory on rank 0: the trained parameters are gathered in full (fp32) to the CPU and written,
    then released before the AdamW state (two fp32 moments, twice that size) is gathered and written,
    so the peak is about 8 bytes per trained parameter (stage 2 of the 8B model: ~64 GB) on top of
    the process's own memory. Other ranks receive nothing. For sharded saves at scale (each rank
    writes its own shards), use ``torch.distributed.checkpoint.save`` instead (see docs/inf_llava.md).
    """
    path = Path(out_dir) / f"checkpoint-{step}"
    tmp = Path(out_dir) / f".tmp-checkpoint-{step}"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    # One part at a time: gather (collective), write on rank 0, drop, then the next part.
    model_sd = get_model_state_dict(model, options=_FULL)
    if _rank() == 0:
        save_file(_writable(model_sd), tmp / "model.safetensors", metadata={"step": str(step)})
    del model_sd
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if _rank() == 0:
        state = {
            f"{name}/{key}": torch.as_tensor(value)
            for name, per_param in optim_sd["state"].items()
            for key, value in per_param.items()
        }
        save_file(_writable(state), tmp / "optimizer.safetensors")
        del state
        meta = {
            "step": step,
            "param_groups": optim_sd["param_groups"],
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            **(extra or {}),
        }
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1, default=str))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    del optim_sd
    _barrier()
    return path


def latest_checkpoint(out_dir) -> Path | None:
    """The ``checkpoint-<step>`` directory with the largest step under ``out_dir``, or ``None``."""
    found = [
        (int(m.group(1)), p)
        for p in Path(out_dir).glob("checkpoint-*")
        if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
    ]
    return max(found)[1] if found else None


def load_trained_weights(path, model, *, require_all_trainable: bool = False) -> list[str]:
    """Load ``model.safetensors`` of a checkpoint (or that file itself) into ``model`` (plain or wrapped).

    Every key must name a parameter of ``model``; with ``require_all_trainable``, every trainable
    parameter of ``model`` must be in the file. Returns the loaded names.
    """
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"load_trained_weights: no model.safetensors at {path}; pass a checkpoint directory.")
    weights = load_file(file)
    names = {n for n, _ in get_model_state_dict(model, options=StateDictOptions(full_state_dict=False)).items()}
    unknown = sorted(set(weights) - names)
    if unknown:
        raise ValueError(
            f"load_trained_weights: {file} has {len(unknown)} key(s) the model lacks, e.g. {unknown[:3]}; "
            "was it written for another config?"
        )
    if require_all_trainable:
        trainable = {n for n, p in _named_trainable(model)}
        missing = sorted(trainable - set(weights))
        if missing:
            raise ValueError(
                f"load_trained_weights: {file} lacks {len(missing)} trainable parameter(s), e.g. {missing[:3]}; "
                "resume with the same --stage as the checkpoint (use --init-from to start stage 2 from stage 1)."
            )
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    return sorted(weights)


def _named_trainable(model):
    inner = getattr(model, "module", model)  # DDP keeps the model under .module
    return [(n, p) for n, p in inner.named_parameters() if p.requires_grad]


def load_checkpoint(path, model, optimizer, scheduler) -> dict:
    """Restore trained weights, optimizer and scheduler from ``path``; returns ``trainer_state.json``."""
    path = Path(path)
    load_trained_weights(path, model, require_all_trainable=True)
    meta = json.loads((path / "trainer_state.json").read_text())
    flat = load_file(path / "optimizer.safetensors")
    state: dict[str, dict] = {}
    for key, value in flat.items():
        name, _, field = key.rpartition("/")
        state.setdefault(name, {})[field] = value
    optim_sd = {"state": state, "param_groups": meta["param_groups"]}
    set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    return meta
