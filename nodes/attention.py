"""Attention hooks shared by the techniques: plain attention on projected q/k/v, a feature collector (a bank of the
normed tokens entering attn1 per block, as BootPIG's ``collect_attn_feats``), and patch-object conventions.

Patch objects registered in ``transformer_options`` are immutable values: ComfyUI 0.3.75 deep-copies
``model_options`` on every ``clone()`` (``__deepcopy__`` returns the object itself, so tensors and models they hold
are shared, not copied), and current ComfyUI shares them by reference. Per-call state travels in the per-call
``transformer_options`` dict instead, so nothing leaks into the parent model or the next prompt.
"""
from __future__ import annotations

import torch

from .introspect import BlockKey


class PatchValue:
    """Base for patch objects: shared on clone (never deep-copied), device moves are no-ops (tensors are moved at
    call time), and no models to load unless a subclass says so."""

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    def to(self, *args, **kwargs):  # ModelPatcher.model_patches_to(device) and (dtype)
        return self

    def models(self) -> list:
        return []


def to_device(t: torch.Tensor, device, dtype=None) -> torch.Tensor:
    """Host -> device copy that does not block the host: from pinned memory with ``non_blocking`` on CUDA (the
    caching host allocator keeps the pinned block alive until the copy is done). Used once per device (caches)."""
    device = torch.device(device)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device, non_blocking=True)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, extra_options: dict | None = None,
              attn_precision=None) -> torch.Tensor:
    """ComfyUI's optimized attention on projected [B, T, heads*dim] tensors (overrides such as sage honoured)."""
    import comfy.ldm.modules.attention as A

    if extra_options is not None:
        attn_precision = extra_options.get("attn_precision", attn_precision)
        return A.optimized_attention(q, k, v, heads, attn_precision=attn_precision, transformer_options=extra_options)
    return A.optimized_attention(q, k, v, heads, attn_precision=attn_precision)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v in float64, per head: the ground truth tests compare against."""
    b, tq, hd = q.shape
    d = hd // heads
    qh = q.double().view(b, tq, heads, d).transpose(1, 2)
    kh = k.double().view(b, k.shape[1], heads, d).transpose(1, 2)
    vh = v.double().view(b, v.shape[1], heads, d).transpose(1, 2)
    w = torch.softmax(qh @ kh.transpose(-1, -2) / d ** 0.5, dim=-1)
    return (w @ vh).transpose(1, 2).reshape(b, tq, hd)


class FeatureCollector(PatchValue):
    """attn1_patch that records the normed tokens entering each attn1 into ``transformer_options[bank_key]``
    (a dict BlockKey -> tensor made fresh for each call) and leaves attention unchanged."""

    def __init__(self, bank_key: str):
        self.bank_key = bank_key

    def __call__(self, n, context, value, extra_options):
        bank = extra_options.get(self.bank_key)
        if bank is not None:
            bank[BlockKey.from_options(extra_options)] = n
        return n, context, value


def with_attn1_collector(transformer_options: dict, bank_key: str) -> tuple[dict, dict]:
    """A copy of ``transformer_options`` whose attn1 patches end with a FeatureCollector, and the fresh bank."""
    bank: dict = {}
    to = dict(transformer_options)
    patches = {k: list(v) for k, v in to.get("patches", {}).items()}
    patches["attn1_patch"] = patches.get("attn1_patch", []) + [FeatureCollector(bank_key)]
    to["patches"] = patches
    to[bank_key] = bank
    return to, bank
