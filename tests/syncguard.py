"""Keeps host-device syncs and host->device copies off the pack's per-block and per-call paths, on a CPU machine.

* ``DeviceTensor``: a tensor subclass standing for "lives on the accelerator". The sampler's noise, latent and sigmas
  are made DeviceTensors; every tensor computed from them is one too (``__torch_function__`` propagation), so the
  UNet's hidden states, the call's timesteps and ``transformer_options["sigmas"]`` all are.
* ``guarded(fn)``: while the pack's own code runs (its patch and wrapper functions, not ComfyUI's code they call
  through an executor), a TorchFunctionMode raises ``SyncError`` on
  - ``.item()``, ``float()``, ``int()``, ``bool()``, ``.tolist()``, ``.numpy()``, ``.cpu()`` of a DeviceTensor
    (each would wait for the device), and
  - blocking host->device copies: ``.to(<device>)`` / ``.cuda()`` of a host tensor without ``non_blocking=True``,
    ``torch.tensor(..., device=...)`` / ``torch.as_tensor(..., device=...)`` (ComfyUI's own weight casts, on
    ``nn.Parameter``\\ s, are its business and allowed).
* With a GPU present, ``torch.cuda.set_sync_debug_mode("error")`` is switched on inside the same scopes.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import torch
from torch.overrides import TorchFunctionMode


class SyncError(AssertionError):
    pass


class DeviceTensor(torch.Tensor):
    """Marks a tensor that would live on the accelerator."""


_T = torch.Tensor
SYNCING = {_T.item, _T.__float__, _T.__int__, _T.__bool__, _T.__index__, _T.tolist, _T.numpy, _T.cpu}
_state = threading.local()
SEEN: list = []  # names of the guarded functions that ran (a test asserts the guard was really exercised)


def _depth() -> int:
    return getattr(_state, "depth", 0)


def _is_device_arg(a) -> bool:
    return isinstance(a, (torch.device, str)) or (isinstance(a, torch.Tensor))


class _Mode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _depth() > 0:
            where = getattr(_state, "where", "?")
            name = getattr(func, "__name__", str(func))
            if func in SYNCING and args and isinstance(args[0], DeviceTensor):
                raise SyncError(f"{where}: {name}() on a device tensor (a host-device sync)")
            if func is _T.to and args and isinstance(args[0], torch.Tensor):
                src = args[0]
                moves = "device" in kwargs or any(_is_device_arg(a) for a in args[1:])
                if (moves and not isinstance(src, (DeviceTensor, torch.nn.Parameter))
                        and not kwargs.get("non_blocking", False)):
                    raise SyncError(f"{where}: blocking host->device copy .to() of a host tensor {tuple(src.shape)}")
            if func is _T.cuda and args and not isinstance(args[0], (DeviceTensor, torch.nn.Parameter)):
                raise SyncError(f"{where}: .cuda() of a host tensor")
            if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None:
                raise SyncError(f"{where}: {name}(..., device=...) copies from the host")
        return func(*args, **kwargs)


@contextlib.contextmanager
def _scope(where: str | None):
    old = (_depth(), getattr(_state, "where", None))
    _state.depth = 0 if where is None else old[0] + 1
    _state.where = where or old[1]
    cuda = torch.cuda.is_available()
    if cuda:
        prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error" if _state.depth > 0 else "default")
    try:
        yield
    finally:
        _state.depth, _state.where = old
        if cuda:
            torch.cuda.set_sync_debug_mode(prev)


class _Unguarded:
    """An executor handed to a guarded wrapper: ComfyUI's code behind it runs unguarded."""

    def __init__(self, executor):
        self._ex = executor
        self.class_obj = getattr(executor, "class_obj", None)

    def __call__(self, *args, **kwargs):
        with _scope(None):
            return self._ex(*args, **kwargs)


def guarded(fn, name: str, executor_at: int | None = None):
    """``fn`` run inside a guarded scope; ``executor_at``: the position of a wrapper's executor argument."""
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        SEEN.append(name)
        if executor_at is not None:
            args = list(args)
            args[executor_at] = _Unguarded(args[executor_at])
        with _scope(name):
            return fn(*args, **kwargs)
    return inner


@contextlib.contextmanager
def active():
    """The mode, for the whole block (it only acts inside guarded scopes)."""
    SEEN.clear()
    with _Mode():
        yield


def as_device(t: torch.Tensor) -> DeviceTensor:
    return t.as_subclass(DeviceTensor)
