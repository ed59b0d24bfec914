"""The toy world's text-to-image model, built from ComfyUI's own classes.

- UNet: ``comfy.model_base.BaseModel`` from ``comfy.supported_models.SD15`` with a narrow ``unet_config`` (full SD1.5
  block structure: 16 transformer blocks, context_dim 768, eps-prediction, SD1.5's discrete schedule). The shipped
  (world v2) model: 128x128 px images = 16x16 latents (``UNET_CONFIG_V2``); the random model of the mechanics tests
  keeps world v1's 64 px = 8x8 latents (``UNET_CONFIG``), a quarter of the cost on a CPU.
- Text encoder: ``comfy.sd.CLIP`` over ``comfy.sd1_clip.SD1ClipModel`` (CLIP-L layout, ComfyUI's bundled tokenizer)
  with one transformer layer whose residual branches are zero, i.e. a bag-of-words encoder: every token's output is
  LayerNorm(token embedding). Token embeddings are a fixed deterministic function of the token id (``token_table``),
  so the text encoder needs no weights file; the UNet learns to read it. (The caption grammar puts one subject in a
  scene, so word order carries nothing the model needs.)
- VAE: ``comfy.sd.VAE`` with the TAESD architecture, trained on toy renders (``vae_scale`` = 0.18215 so the SD1.5
  latent format gives the UNet unit-scale latents).

Weights live in ``weights/toyworld/`` (``unet.safetensors``, ``vae.safetensors``), retrained by
``scripts/train_toyworld.py``.
"""
from __future__ import annotations

import functools
import math
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS_DIR = os.path.normpath(os.path.join(HERE, "..", "weights", "toyworld"))
SEGMENTER_PATH = os.path.join(WEIGHTS_DIR, "segmenter.safetensors")   # the toy mask source (toyworld/segmenter.py)

UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 8, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 2, 2], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 2, "num_head_channels": -1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# UNET_CONFIG: world v1's UNet (64 px images, 8x8 latents), now the random model's (``load_random``).
# world v2's UNet (the shipped one): the same width and blocks (4.5 M parameters, 9 MB in fp16) on 16x16 latents (128 px images), 4
# heads instead of 2 (free in parameters): resolution, not width, is what the v1 model lacked
UNET_CONFIG_V2 = dict(UNET_CONFIG, image_size=16, num_heads=4)
CLIP_CONFIG = {"num_hidden_layers": 1, "intermediate_size": 64, "num_attention_heads": 4}
VOCAB_DIM = 768
VAE_SCALE = 0.18215
IMAGE_SIZE = 64     # the random model's image size (and the default where no shipped weights are present)


def model_config(unet_config: dict | None = None):
    import comfy.supported_models as sm

    unet_config = unet_config or UNET_CONFIG
    mc = sm.SD15(dict(unet_config))
    mc.unet_config["num_heads"] = unet_config["num_heads"]
    mc.unet_config["num_head_channels"] = -1
    mc.set_inference_dtype(torch.float32, None)
    return mc


def build_unet(state_dict: dict | None = None, device=None, unet_config: dict | None = None):
    """A ModelPatcher over the toy BaseModel (``unet_config``: UNET_CONFIG by default); weights from ``state_dict``
    (diffusion_model keys without prefix)."""
    import comfy.model_management as mm
    import comfy.model_patcher

    bm = model_config(unet_config).get_model({})
    if state_dict is not None:
        bm.diffusion_model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    load = device if device is not None else mm.get_torch_device()
    return comfy.model_patcher.ModelPatcher(bm, load_device=load, offload_device=mm.unet_offload_device())


@functools.lru_cache(maxsize=2)
def token_table(n: int = 49408, dim: int = VOCAB_DIM) -> torch.Tensor:
    """Fixed pseudo-random token embeddings: E[i, j] = sqrt(2) sin(i f_j + p_j) with irrational frequencies/phases.
    Deterministic on every platform (float64 math), near-orthogonal rows, no file needed. Cached (about 2 s to
    compute on a CPU): callers read it, never modify it in place."""
    j = torch.arange(dim, dtype=torch.float64)
    f = 2 * math.pi * torch.frac((j + 1) * 0.6180339887498949 + 0.1234567)
    p = 2 * math.pi * torch.frac((j + 1) * 0.7548776662466927)
    i = torch.arange(n, dtype=torch.float64)[:, None]
    return (math.sqrt(2.0) * torch.sin(i * f[None] + p[None])).float()


@torch.no_grad()
def build_clip():
    """A real comfy.sd.CLIP (SD1 tokenizer + SD1ClipModel, CLIP-L layout, 1 identity layer): bag-of-words encoder."""
    import comfy.sd
    import comfy.sd1_clip
    from comfy.supported_models_base import ClipTarget

    clip = comfy.sd.CLIP(target=ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel),
                         model_options={"clip_l_model_config": dict(CLIP_CONFIG)})
    tm = clip.cond_stage_model.clip_l.transformer.text_model
    for name, p in tm.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if "layer_norm" in name or "norm" in name.split(".")[-2]:
            p.fill_(1.0 if leaf == "weight" else 0.0)
        else:
            p.zero_()
    tm.embeddings.token_embedding.weight.copy_(token_table(tm.embeddings.token_embedding.weight.shape[0]))
    proj = getattr(clip.cond_stage_model.clip_l.transformer, "text_projection", None)
    if proj is not None:
        proj.weight.copy_(torch.eye(*proj.weight.shape))
    for name, b in clip.cond_stage_model.named_buffers():
        if b.is_floating_point() and torch.isnan(b).any():
            b.zero_()
    return clip


def new_taesd():
    from comfy.taesd.taesd import TAESD

    net = TAESD()
    with torch.no_grad():
        net.vae_scale.fill_(VAE_SCALE)
    return net


def build_vae(state_dict: dict):
    """A real comfy.sd.VAE (TAESD architecture) from a TAESD state dict (taesd_encoder.* / taesd_decoder.* / vae_*)."""
    import comfy.sd

    return comfy.sd.VAE(sd={k: v.float() for k, v in state_dict.items()})


def weights_present(weights_dir: str = WEIGHTS_DIR) -> bool:
    return all(os.path.isfile(os.path.join(weights_dir, f)) for f in ("unet.safetensors", "vae.safetensors"))


def image_size(weights_dir: str = WEIGHTS_DIR) -> int:
    """The image size (px) the toy UNet in ``weights_dir`` was trained at: the ``size`` of the recipe in its metadata
    (128 for world v2); 64 for files without the key (world v1's, in the history before the switch)."""
    import json

    from safetensors import safe_open

    with safe_open(os.path.join(weights_dir, "unet.safetensors"), "pt") as f:
        meta = f.metadata() or {}
    return int(json.loads(meta.get("config", "{}")).get("size", IMAGE_SIZE))


def shipped_image_size() -> int:
    """The image size (px) of the shipped toy model (``WEIGHTS_DIR``): what its renders, latents and example
    workflows use; ``IMAGE_SIZE`` when the weights are absent (a clone without them, the random model)."""
    return image_size(WEIGHTS_DIR) if weights_present() else IMAGE_SIZE


def unet_config_for(size: int) -> dict:
    """The UNet config of the toy model trained at ``size`` px: world v2 (128, shipped) or the 64 px random model."""
    configs = {IMAGE_SIZE: UNET_CONFIG, 128: UNET_CONFIG_V2}
    if size not in configs:
        raise ValueError(f"toy world: no UNet config for {size} px images (known: {sorted(configs)})")
    return configs[size]


def load(weights_dir: str = WEIGHTS_DIR):
    """(MODEL, CLIP, VAE) of the trained toy world in ``weights_dir``, as real ComfyUI objects (the UNet's config
    follows the size it was trained at, ``image_size``)."""
    from safetensors.torch import load_file

    unet = build_unet(load_file(os.path.join(weights_dir, "unet.safetensors")),
                      unet_config=unet_config_for(image_size(weights_dir)))
    vae = build_vae(load_file(os.path.join(weights_dir, "vae.safetensors")))
    return unet, build_clip(), vae


def generate(model, clip, vae, prompt: str, seed: int, n: int = 1, size: int = IMAGE_SIZE, steps: int = 20,
             cfg: float = 5.0, sampler: str = "euler", scheduler: str = "normal", init: torch.Tensor | None = None,
             denoise: float = 1.0) -> torch.Tensor:
    """n images [n, size, size, 3] in [0, 1] of ``prompt`` (empty negative prompt), as a ComfyUI workflow makes them:
    CLIPTextEncode, Empty Latent (or VAEEncode of ``init`` images [n, size, size, 3] for img2img at ``denoise``),
    KSampler (seed, steps, cfg, sampler, scheduler), VAEDecode. The toy world's one sampling path: the quality bench
    and the training script's checks both call it."""
    import nodes

    pos = nodes.CLIPTextEncode().encode(clip, prompt)[0]
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    if init is None:
        latent = {"samples": torch.zeros(n, 4, size // 8, size // 8)}
    else:
        latent = nodes.VAEEncode().encode(vae, init)[0]
    out = nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, pos, neg, latent, denoise=denoise)[0]
    return nodes.VAEDecode().decode(vae, out)[0].float().clamp(0, 1)


def load_random(seed: int = 0):
    """The same objects with seeded random UNet / VAE weights (mechanics tests without trained weights)."""
    import comfy.model_management  # noqa: F401

    g = torch.Generator().manual_seed(seed)

    def fill(module):
        with torch.no_grad():
            for name, p in module.named_parameters():
                if p.ndim <= 1:
                    p.copy_(torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
        return module

    bm_unet = build_unet()
    fill(bm_unet.model.diffusion_model)
    net = new_taesd()
    fill(net.taesd_encoder)
    fill(net.taesd_decoder)
    return bm_unet, build_clip(), build_vae(net.state_dict())
