"""Safetensors I/O shared by every technique: atomic writes (temporary name, then rename), key checks on load."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Iterable, Mapping

import torch


def save_atomic(tensors: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, object] | None = None) -> str:
    """Write a safetensors file so that a killed run never leaves a truncated file under ``path``."""
    from safetensors.torch import save_file

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".safetensors.partial", dir=directory)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load(path: str, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    tensors = {}
    with safe_open(path, framework="pt", device=device) as f:
        meta = dict(f.metadata() or {})
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    return tensors, meta


def check_keys(found: Iterable[str], expected: Iterable[str], what: str, input_name: str) -> None:
    """Raise an InputError naming the missing keys (the first few) if ``found`` lacks any of ``expected``."""
    from .errors import InputError

    missing = sorted(set(expected) - set(found))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InputError(input_name, f"a complete {what}", f"a file missing {len(missing)} keys: {shown}")
