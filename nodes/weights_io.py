"""Weight files, once for every technique.

- ``load``: the one loader. Every failure (missing, empty, a text file, truncated or corrupt safetensors, a pickle,
  non-finite values) becomes an ``InputError`` naming the node input and the file. Pickles are never unpickled into
  Python objects: .safetensors is read with safetensors; a PyTorch checkpoint (.pt/.pth, zip or legacy pickle) only
  where the caller allows it, and then with ``torch.load(weights_only=True)`` (tensors and plain containers only).
- ``save_atomic``: refuses non-finite tensors (a NaN file is never written), checks the file name against the file
  system's limit, writes to a temporary name in the same folder and renames it into place, so a killed run never
  leaves a truncated file under the final name.
- ``check_file_name``: the name check on its own, for trainer nodes to run at entry, before training starts.
- ``check_keys``: missing keys named.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Iterable, Mapping

import torch

from .errors import InputError

TEMP_PREFIX = "."
TEMP_SUFFIX = ".safetensors.partial"
TEMP_NAME_LEN = len(TEMP_PREFIX) + 8 + len(TEMP_SUFFIX)  # tempfile.mkstemp: prefix + 8 random characters + suffix


class NonFiniteWeightsError(ValueError):
    """Raised by ``save_atomic`` instead of writing a file that holds NaN or infinite values."""


# ------------------------------------------------------------------------------------------------ names
def _existing_ancestor(path: str) -> str:
    d = os.path.dirname(os.path.abspath(path))
    while d and not os.path.isdir(d):
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    return d or os.sep


def name_max(directory: str) -> int:
    """The longest file name the file system holding ``directory`` accepts (os.pathconf PC_NAME_MAX; 255 if unknown)."""
    try:
        return int(os.pathconf(_existing_ancestor(os.path.join(directory, "x")), "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def path_max(directory: str) -> int:
    try:
        return int(os.pathconf(_existing_ancestor(os.path.join(directory, "x")), "PC_PATH_MAX"))
    except (OSError, ValueError, AttributeError):
        return 4096


def check_file_name(path: str, input_name: str = "save_name", also: Iterable[str] = ()) -> None:
    """InputError unless ``path`` - and the companions in ``also`` (resume files, ...) and the temporary names
    ``save_atomic`` writes first - fit the file system: every folder and file name within PC_NAME_MAX bytes, the
    whole path within PC_PATH_MAX."""
    paths = [os.path.abspath(path)] + [os.path.abspath(p) for p in also]
    limit = name_max(os.path.dirname(paths[0]))
    plimit = path_max(os.path.dirname(paths[0]))
    for p in paths:
        parts = [x for x in p.split(os.sep) if x]
        for part in parts:
            n = len(part.encode("utf-8", "surrogateescape"))
            if n > limit:
                raise InputError(input_name, f"a file name of at most {limit} bytes with its suffixes (this file "
                                 "system's limit)", f"{n} bytes: {part[:40]}...{part[-20:]}",
                                 "Choose a shorter save_name")
        if len(p.encode("utf-8", "surrogateescape")) + TEMP_NAME_LEN > plimit:
            raise InputError(input_name, f"a path of at most {plimit} bytes", f"{len(p)} bytes")
    if TEMP_NAME_LEN > limit:  # pragma: no cover - file systems with names under 30 bytes
        raise InputError(input_name, "a folder whose file system accepts the temporary names used for atomic writes",
                         f"a limit of {limit} bytes")


# ------------------------------------------------------------------------------------------------ finiteness
def nonfinite_keys(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of the floating-point tensors holding NaN or inf. On CPU the check runs on one intra-op thread: hundreds
    of small reductions are dominated by thread wake-ups otherwise (seconds instead of tens of ms on a busy host)."""
    threads = torch.get_num_threads()
    single = threads > 1 and any(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in tensors.values())
    if single:
        torch.set_num_threads(1)
    try:
        return [k for k, v in tensors.items()
                if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    finally:
        if single:
            torch.set_num_threads(threads)


def _bad_text(bad: list, total: int) -> str:
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return f"NaN or infinite values in {len(bad)} of {total} tensors ({shown})"


# ------------------------------------------------------------------------------------------------ save
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_atomic(tensors: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, object] | None = None,
                input_name: str = "save_name") -> str:
    """Write a safetensors file so that a killed run never leaves a truncated file under ``path`` and no file of
    NaN weights is ever written (NonFiniteWeightsError, nothing on disk)."""
    from safetensors.torch import save_file

    bad = nonfinite_keys(tensors)
    if bad:
        raise NonFiniteWeightsError(f"Personalize: refusing to write {os.path.basename(path)}: "
                                    f"{_bad_text(bad, len(tensors))}; nothing was written")
    check_file_name(path, input_name)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=directory)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta)
        # mkstemp makes the file 0600; a weight file gets what any other new file gets (0666 less the umask), so a
        # ComfyUI run by another user or container can read the LoRA it is given
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# ------------------------------------------------------------------------------------------------ load
def sniff(path: str) -> str:
    """'safetensors', 'zip' (torch.save), 'pickle' (legacy torch.save or any pickle), 'empty', 'text' or 'unknown'."""
    size = os.path.getsize(path)
    if size == 0:
        return "empty"
    with open(path, "rb") as f:
        head = f.read(64)
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 2 <= n <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return "pickle"
    try:
        text = head.decode("utf-8")
        if all(c.isprintable() or c in "\r\n\t" for c in text):
            return "text"
    except UnicodeDecodeError:
        pass
    return "unknown"


def load(path: str, device: str = "cpu", input_name: str = "weights", allow_torch: bool = False,
         check_finite: bool = True) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of a weight file, or an InputError naming ``input_name`` and the file.

    ``allow_torch``: also read PyTorch checkpoints (.pt/.pth) with ``torch.load(weights_only=True)``; their object is
    returned as is (a state dict, possibly nested) with empty metadata."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise InputError(input_name, "an existing weights file", repr(path))
    kind = sniff(path)
    want = "a .safetensors file" + (" or a PyTorch checkpoint of tensors (.pt/.pth)" if allow_torch else "")
    if kind == "empty":
        raise InputError(input_name, want, f"{name}: an empty file (0 bytes)")
    if kind == "text":
        raise InputError(input_name, want, f"{name}: a text file, not weights")
    if kind == "unknown":
        raise InputError(input_name, want, f"{name}: not a weights file (unknown format)")
    if kind in ("zip", "pickle"):
        if not allow_torch:
            raise InputError(input_name, want, f"{name}: a PyTorch pickle checkpoint",
                             "Pickles are not loaded here (they can run code); save the weights as .safetensors")
        tensors, meta = _load_torch(path, name, input_name), {}
    else:
        tensors, meta = _load_safetensors(path, name, input_name, device)
    if check_finite:
        flat = dict(_flatten(tensors))
        bad = nonfinite_keys(flat)
        if bad:
            raise InputError(input_name, "weights with finite values", f"{name}: {_bad_text(bad, len(flat))}")
    return tensors, meta


def _load_safetensors(path, name, input_name, device):
    from safetensors import safe_open

    tensors = {}
    try:
        with safe_open(path, framework="pt", device=device) as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: the file, not the caller, is broken
        raise InputError(input_name, "a complete .safetensors file",
                         f"{name}: truncated or corrupt ({type(e).__name__})") from None
    return tensors, meta


def _load_torch(path, name, input_name):
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(input_name, "a checkpoint holding only tensors", f"{name}: a pickle with Python objects",
                         "Pickled objects are never loaded (they can run code); use a plain state dict or "
                         ".safetensors") from None
    except Exception as e:  # noqa: BLE001 - EOFError, RuntimeError (truncated zip), ...
        raise InputError(input_name, "a complete PyTorch checkpoint of tensors",
                         f"{name}: truncated or corrupt ({type(e).__name__})") from None


def _flatten(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix or "tensor", obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}.{i}" if prefix else str(i))


def check_keys(found: Iterable[str], expected: Iterable[str], what: str, input_name: str) -> None:
    """Raise an InputError naming the missing keys (the first few) if ``found`` lacks any of ``expected``."""
    missing = sorted(set(expected) - set(found))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InputError(input_name, f"a complete {what}", f"a file missing {len(missing)} keys: {shown}")
