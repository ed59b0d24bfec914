"""Models with seeded random weights in the real SD1.5 / SDXL layouts, built with ComfyUI's own classes.

No weights are ever downloaded. ``tiny_model`` keeps the real block structure (16 attn1 blocks on SD1.5, 70 on SDXL,
same block keys and token grids) at a narrow width; ``full_model`` is the real size. Call ``scripts.host.bootstrap()``
before importing this module's functions' dependencies.
"""
from __future__ import annotations

import copy
import math

import torch

SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
FAMILIES = ("sd15", "sdxl")


def unet_config(family: str, tiny: bool = True, in_channels: int = 4) -> dict:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    cfg = copy.deepcopy(SD15_UNET if family == "sd15" else SDXL_UNET)
    cfg["in_channels"] = in_channels
    if tiny:
        cfg["model_channels"] = 32  # GroupNorm(32) needs multiples of 32
        if family == "sd15":
            cfg["num_heads"] = 2
        else:
            cfg["num_head_channels"] = 16
    return cfg


@torch.no_grad()
def init_random_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """ComfyUI's ops leave weights uninitialized: fill every parameter deterministically (fan-in scaled normal)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim == 0:
            p.fill_(1.0 if "scale" in leaf else 0.0)
        elif p.ndim == 1:
            is_norm_weight = leaf == "weight"
            p.copy_(torch.ones_like(p) if is_norm_weight else torch.randn(p.shape, generator=g).mul_(0.02).to(p.dtype))
        else:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g).mul_(1.0 / math.sqrt(fan_in)).to(p.dtype))
    for name, b in module.named_buffers():
        if b.is_floating_point() and torch.isnan(b).any():
            b.zero_()
    return module


def model_config(family: str, tiny: bool = True, in_channels: int = 4):
    import comfy.supported_models as sm

    cfg = unet_config(family, tiny, in_channels)
    mc = (sm.SD15 if family == "sd15" else sm.SDXL)(cfg)
    # supported_models' extra config overrides head settings: put the tiny ones back
    for k in ("num_heads", "num_head_channels"):
        if k in cfg:
            mc.unet_config[k] = cfg[k]
    if family == "sd15":
        mc.unet_config["num_head_channels"] = -1
    else:
        mc.unet_config["num_heads"] = -1
    mc.set_inference_dtype(torch.float32, None)
    return mc


def build_model(family: str = "sd15", tiny: bool = True, seed: int = 0, in_channels: int = 4, device=None):
    """A real ``comfy.model_base.BaseModel`` wrapped in a real ``ModelPatcher``, weights seeded-random."""
    import comfy.model_management as mm
    import comfy.model_patcher

    mc = model_config(family, tiny, in_channels)
    model = mc.get_model({})
    init_random_(model.diffusion_model, seed)
    load = device if device is not None else mm.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load, offload_device=mm.unet_offload_device())


def context_dim(family: str) -> int:
    return 768 if family == "sd15" else 2048


def random_conditioning(family: str, batch: int = 1, tokens: int = 77, seed: int = 0, width: int = 64, height: int = 64):
    """A CONDITIONING list as CLIPTextEncode makes it, with random embeddings of the family's width."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, tokens, context_dim(family), generator=g)
    extra = {}
    if family == "sdxl":
        extra = {"pooled_output": torch.randn(batch, 1280, generator=g), "width": width, "height": height,
                 "crop_w": 0, "crop_h": 0, "target_width": width, "target_height": height}
    return [[cond, extra]]


def build_vae(seed: int = 0):
    """A real ``comfy.sd.VAE`` with the TAESD architecture (small, fast) and seeded random weights."""
    import comfy.sd
    from comfy.taesd.taesd import TAESD

    net = TAESD()
    init_random_(net, seed)
    sd = {k: v for k, v in net.state_dict().items()}
    return comfy.sd.VAE(sd=sd)


TINY_CLIP_L = {"num_hidden_layers": 2, "intermediate_size": 512, "num_attention_heads": 4}


def build_clip(tiny: bool = True, seed: int = 0):
    """A real ``comfy.sd.CLIP`` (SD1.5's CLIP-L layout, ComfyUI's bundled tokenizer) with seeded random weights.
    ``tiny`` keeps the 768-wide embeddings SD1.5's UNet expects but only 2 layers."""
    import comfy.sd
    import comfy.sd1_clip
    from comfy.supported_models_base import ClipTarget

    opts = {"clip_l_model_config": dict(TINY_CLIP_L)} if tiny else {}
    clip = comfy.sd.CLIP(target=ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel),
                         model_options=opts)
    init_random_(clip.cond_stage_model, seed)
    return clip
