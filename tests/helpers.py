"""Shared test helpers: run a V1 node the way ComfyUI does, sample with the stock KSampler path."""
from __future__ import annotations

import torch


def run_node(node_cls, **inputs):
    """Call a V1 node's FUNCTION on a fresh instance under inference mode, as ComfyUI's executor does."""
    with torch.inference_mode():
        return getattr(node_cls(), node_cls.FUNCTION)(**inputs)


def sample(model, positive, negative, latent=None, steps=3, cfg=5.0, seed=1, sampler="euler", scheduler="normal",
           size=(8, 8), batch=1, denoise=1.0):
    """Stock KSampler (nodes.common_ksampler) under inference mode; returns the latent samples tensor."""
    import nodes

    if latent is None:
        latent = {"samples": torch.zeros(batch, 4, *size)}
    with torch.inference_mode():
        out = nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent,
                                    denoise=denoise, disable_noise=False)[0]
    return out["samples"].clone()
