"""Helpers for training inside ComfyUI, shared by the trainers (DreamBooth, Subject-Diffusion)."""
from __future__ import annotations

import types

import torch


def out_of_place_clip(text_module: torch.nn.Module) -> torch.nn.Module:
    """ComfyUI's CLIPLayer adds its residuals in place (``x += ...``): fine for inference, rejected by autograd once
    gradients must flow through the layers. On a training copy only, give every CLIPLayer an out-of-place forward
    with the same maths. Returns the module."""
    from comfy.clip_model import CLIPLayer

    def forward(self, x, mask=None, optimized_attention=None):
        x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
        return x + self.mlp(self.layer_norm2(x))

    for m in text_module.modules():
        if isinstance(m, CLIPLayer):
            m.forward = types.MethodType(forward, m)
    return text_module
