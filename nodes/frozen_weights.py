"""The pack's one way to freeze ComfyUI's weights for autograd without copying them.

ComfyUI loads checkpoints under ``torch.inference_mode()``: the UNet's weights are *inference tensors*, which autograd
refuses to save for backward. Copying them (the old trainers cloned the whole UNet) doubles the model's memory.
Instead, a frozen weight is *aliased*: a normal tensor over the same storage (``alias``), never written to.

- ``frozen_copy(module, train=...)``: for training. New module objects (so layers can be wrapped, e.g. by LoRA, without
  touching the model the graph holds) whose frozen parameters and buffers alias the original storage; only the
  parameters named in ``train`` are cloned (as float32 masters) and require grad. Covers both kinds of trainer:
  adapters around frozen layers (DreamBooth LoRA) and existing weights trained in place (Subject-Diffusion's conv_in
  and attn2 k/v; BootPIG's reference UNet and the base attn1 projections).
- ``ParamAlias(module)``: for guidance during sampling (Pick-and-Draw), where the model's own modules must run: swaps
  the inference-tensor parameters for aliases while active and puts the very same objects back on exit.
- ``InferenceAlias``: the per-op fallback when some other inference tensor (held by another pack's patch) reaches
  autograd.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch


def alias(t: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) tensor sharing ``t``'s storage: no copy."""
    if not t.is_inference():
        return t.detach()
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), t.size(),
                                                                 t.stride())


def frozen_copy(module: torch.nn.Module, train: Iterable[str] | Callable[[str], bool] = (),
                train_dtype: torch.dtype | None = torch.float32, frozen_dtype: torch.dtype | None = None,
                device=None) -> tuple[torch.nn.Module, dict[str, torch.nn.Parameter]]:
    """(copy, {name: trainable parameter}). Frozen parameters/buffers of the copy alias ``module``'s storage (a copy
    only where ``frozen_dtype`` or ``device`` asks for another dtype or device); the named trainables are cloned to
    ``train_dtype`` (None: their own dtype) and require grad. ``module`` itself is not modified."""
    wanted = train if callable(train) else set(train).__contains__
    names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
    with torch.inference_mode(False):
        memo: dict[int, object] = {}
        trainables: dict[str, torch.nn.Parameter] = {}
        for t in list(module.parameters()) + list(module.buffers()):
            if id(t) in memo:
                continue
            name = names.get(id(t))
            if name is not None and wanted(name):
                data = t.detach().to(device=device, dtype=train_dtype if t.is_floating_point() else None,
                                     copy=True)
                if data.is_inference():
                    data = data.clone()
                p = torch.nn.Parameter(data, requires_grad=True)
                trainables[name] = p
                memo[id(t)] = p
                continue
            data = alias(t)
            cast = frozen_dtype is not None and data.is_floating_point() and data.dtype != frozen_dtype
            if cast or not _same_device(data.device, device):
                data = data.to(device=device, dtype=frozen_dtype if cast else None)
            memo[id(t)] = torch.nn.Parameter(data, requires_grad=False) if isinstance(t, torch.nn.Parameter) else data
        out = copy.deepcopy(module, memo)
    missing = [n for n in (train if not callable(train) else []) if n not in trainables]
    if missing:
        raise KeyError(f"frozen_copy: no parameter named {missing[:3]}")
    out.train(False)
    return out, trainables


def _same_device(have: torch.device, want) -> bool:
    if want is None:
        return True
    want = torch.device(want)
    return have.type == want.type and (want.index is None or have.index == want.index)


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class ParamAlias:
    """While active, every inference-tensor parameter/buffer of ``module`` is swapped for a normal alias of the same
    storage (restored on exit, the very same objects), so autograd can save weights for the backward to the latent.
    Built per guided step: ~one Python pass over the parameters, no per-op cost, no copy."""

    def __init__(self, module):
        self.module = module
        self.saved: list = []

    def __enter__(self):
        for mod in self.module.modules():
            for store in (mod._parameters, mod._buffers):
                for name, t in list(store.items()):
                    if t is not None and t.is_inference():
                        self.saved.append((store, name, t))
                        a = alias(t)
                        store[name] = torch.nn.Parameter(a, requires_grad=False) if isinstance(
                            t, torch.nn.Parameter) else a
        return self

    def __exit__(self, *exc):
        for store, name, t in reversed(self.saved):
            store[name] = t
        self.saved.clear()
        return False


class InferenceAlias(torch.overrides.TorchFunctionMode):
    """Fallback when some other inference tensor (not a parameter of the UNet, e.g. one held by another pack's patch)
    reaches autograd: hands every torch op a normal alias of each inference-tensor argument (per-op Python cost)."""

    def __init__(self):
        super().__init__()
        self.cache: dict = {}

    def _swap(self, t):
        if isinstance(t, torch.Tensor) and t.is_inference():
            hit = self.cache.get(id(t))
            if hit is None:
                hit = self.cache[id(t)] = (alias(t), t)
            return hit[0]
        return t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        from torch.utils._pytree import tree_map

        return func(*tree_map(self._swap, args), **tree_map(self._swap, kwargs))
