"""DreamBooth-LoRA training loop on ComfyUI's own models (papers.md §D; comfyui-host.md §2).

One loop for the node and the CLI (``scripts/train_dreambooth.py``), single process or under ``torchrun`` with
DistributedDataParallel:

- data: instance photos -> center crop + resize -> VAE -> latents; class images sampled by the *frozen* base model
  with ComfyUI's sampler (``comfy.sample.sample``), cached on disk under a hash of model + prompt + count + seed (+
  sampler settings), so a second run reuses them;
- loss (diffusers' pairing, DreamBooth Eq. 2): one forward over [instance examples; class examples], the prediction
  split in two, ``MSE(instance) + prior_loss_weight * MSE(class)``; DDPM noise on t ~ U{0..999}, eps or v target
  from the model's own ``model_sampling``;
- LoRA on a structural copy of the UNet (``lora.trainable_copy``): ComfyUI 0.3.75 loads weights as inference
  tensors, which cannot take part in backward; the input model is never modified;
- determinism: everything random in step s (which examples, noise, timesteps) comes from generators seeded by
  (seed, s) over the *global* batch; each DDP rank takes its slice. A resumed run therefore replays the exact
  stream, and N ranks x batch b equals 1 rank x batch N*b up to float summation order;
- checkpoints: ``<save>.resume`` (LoRA + AdamW state + step, safetensors format, written by ``save_atomic``) every
  ``checkpoint_every`` steps; a rerun with the same save name and settings continues from it; the final kohya
  file is written atomically and the resume file removed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import introspect, lora
from .trainable import out_of_place_clip
from .errors import InputError, require
from .validation import check_image
from .weights_io import load as load_safetensors, save_atomic

LOG = logging.getLogger("personalize.dreambooth")
FAMILY_VERSION = {"sd15": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCH = {"sd15": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-512/lora",
                  "sdxl": "stable-diffusion-xl-v1-base/lora"}
TRAINING_DTYPES = ("auto", "fp32", "bf16", "fp16")
RESUME_SUFFIX = ".resume"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class TrainConfig:
    """Defaults: diffusers' DreamBooth-LoRA README recipe for SD (lr 1e-4, batch 1, 500 steps, rank 4 with
    alpha = rank, AdamW (0.9, 0.999, wd 1e-2, eps 1e-8), grad clip 1.0, constant LR) with prior preservation
    (prior_loss_weight 1.0, 100 class images = diffusers' --num_class_images default)."""

    instance_prompt: str = "a photo of sks dog"
    class_prompt: str = "a photo of dog"
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    rank: int = 4
    alpha: float = 4.0
    learning_rate: float = 1e-4
    text_encoder_lr: float = 5e-6
    steps: int = 500
    batch_size: int = 1  # per process; the global batch is batch_size x world size
    resolution: int = 512
    seed: int = 0
    train_text_encoder: bool = False
    targets: str = "attention"
    gradient_checkpointing: bool = False
    training_dtype: str = "auto"
    checkpoint_every: int = 100
    class_steps: int = 50
    class_cfg: float = 7.5
    class_sampler: str = "euler_ancestral"
    class_scheduler: str = "normal"
    class_batch: int = 4
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0


@dataclass
class TrainResult:
    path: str
    lora_sd: dict
    metadata: dict
    losses: list = field(default_factory=list)  # [(step, instance_loss, prior_loss)]
    resumed_from: int = 0
    class_cache: str | None = None
    class_cache_hit: bool = False


# ----------------------------------------------------------------------------------------------------------------
# inputs

_BAD_CHARS = re.compile(r'[\x00-\x1f<>:"|?*\\]')


def sanitize_save_name(name: str, input_name: str = "save_name") -> str:
    """A relative name under models/loras (subfolders allowed), without extension; no traversal, no absolute path."""
    require(isinstance(name, str) and name.strip() != "", input_name, "a non-empty file name", repr(name))
    n = name.strip()
    if n.lower().endswith(".safetensors"):
        n = n[: -len(".safetensors")]
    parts = n.split("/")
    if (n.startswith(("/", "~")) or os.path.isabs(n) or _BAD_CHARS.search(n)
            or any(p in ("", ".", "..") for p in parts) or any(p.startswith(".") for p in parts)):
        raise InputError(input_name, "a plain file name under models/loras (letters, digits, _ - space, optional "
                         "sub/folder), without '..', a leading '/', '\\' or any of <>:\"|?*", repr(name))
    return n


def save_path_for(directory: str, name: str, overwrite: bool, input_name: str = "save_name") -> str:
    name = sanitize_save_name(name, input_name)
    root = os.path.realpath(directory)
    path = os.path.realpath(os.path.join(root, name + ".safetensors"))
    require(os.path.commonpath([root, path]) == root, input_name, f"a name inside {root}", repr(name))
    if os.path.exists(path) and not overwrite:
        raise InputError(input_name, "a name that does not exist yet", f"{name}.safetensors (already in {root})",
                         hint="choose another save_name or set overwrite to true")
    return path


def load_image_dir(directory: str, input_name: str = "images") -> list[torch.Tensor]:
    """Every image in a folder (sorted by name) as float [H, W, 3] tensors in 0..1."""
    import numpy as np
    from PIL import Image, ImageOps

    require(os.path.isdir(directory), input_name, "a folder of instance photos", repr(directory))
    files = sorted(f for f in os.listdir(directory) if f.lower().endswith(IMAGE_EXTS))
    require(len(files) > 0, input_name, f"a folder with at least one image ({', '.join(IMAGE_EXTS)})",
            f"none in {directory}")
    out = []
    for f in files:
        with Image.open(os.path.join(directory, f)) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0))
    return out


def as_image_list(images, input_name: str = "instance_images") -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        require(images.ndim == 4 and images.shape[-1] in (3, 4), input_name, "an IMAGE batch [B, H, W, 3]",
                tuple(images.shape))
        images = [images[i] for i in range(images.shape[0])]
    images = list(images or [])
    require(len(images) > 0, input_name, "at least one instance photo (3-5 is usual)", "none")
    for im in images:
        require(isinstance(im, torch.Tensor) and im.ndim == 3 and im.shape[-1] in (3, 4) and min(im.shape[:2]) >= 8,
                input_name, "images [H, W, 3] of at least 8x8 pixels", tuple(getattr(im, "shape", ())))
        check_image(im, input_name)  # finite, 0..1: before any encoding or training (CLI runs too)
    return images


def prepare_pixels(images: Sequence[torch.Tensor], resolution: int) -> torch.Tensor:
    """Center crop to square and resize (area) to resolution: [N, res, res, 3]."""
    import comfy.utils

    out = []
    for im in images:
        x = im[..., :3].float().movedim(-1, 0).unsqueeze(0)
        x = comfy.utils.common_upscale(x, resolution, resolution, "area", "center")
        out.append(x.squeeze(0).movedim(0, -1).clamp(0, 1))
    return torch.stack(out)


def validate_config(cfg: TrainConfig) -> None:
    require(isinstance(cfg.rank, int) and cfg.rank >= 1, "rank", "an integer from 1 to the width of the smallest "
            "trained layer", cfg.rank)
    require(cfg.alpha > 0, "alpha", "a positive number (scale = alpha / rank)", cfg.alpha)
    require(cfg.steps >= 1, "steps", "at least 1", cfg.steps)
    require(cfg.batch_size >= 1, "batch_size", "at least 1", cfg.batch_size)
    require(cfg.learning_rate > 0, "learning_rate", "a positive number", cfg.learning_rate)
    require(cfg.prior_loss_weight >= 0, "prior_loss_weight", "0 (no prior preservation) or more",
            cfg.prior_loss_weight)
    require(cfg.prior_loss_weight == 0 or cfg.num_class_images >= 1, "num_class_images",
            "at least 1 when prior_loss_weight > 0", cfg.num_class_images)
    require(cfg.resolution >= 64 and cfg.resolution % 8 == 0, "resolution", "a multiple of 8, at least 64",
            cfg.resolution)
    require(cfg.training_dtype in TRAINING_DTYPES, "training_dtype", f"one of {TRAINING_DTYPES}", cfg.training_dtype)
    require(cfg.targets in lora.UNET_TARGETS, "targets", f"one of {tuple(lora.UNET_TARGETS)}", cfg.targets)
    require(cfg.checkpoint_every >= 0, "checkpoint_every", "0 (never) or a number of steps", cfg.checkpoint_every)
    require("{class}" not in cfg.instance_prompt and "{class}" not in cfg.class_prompt, "instance_prompt",
            "prompts with {class} already filled in", cfg.instance_prompt)


def fill_class(prompt: str, class_noun: str) -> str:
    return prompt.replace("{class}", class_noun.strip())


# ----------------------------------------------------------------------------------------------------------------
# fingerprints (cache keys, resume checks)

def _fp_tensor(h, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    if t.numel():
        f = t.flatten()
        h.update(f"{float(f.double().sum()):.10e}|{float(f.double().abs().sum()):.10e}|".encode())
        h.update(f[:8].double().cpu().numpy().tobytes())


def _fp_obj(h, obj, depth=0) -> None:
    if depth > 6:
        return
    if isinstance(obj, torch.Tensor):
        _fp_tensor(h, obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _fp_obj(h, o, depth + 1)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _fp_obj(h, obj[k], depth + 1)
    elif isinstance(obj, (int, float, str, bool)) or obj is None:
        h.update(repr(obj).encode())
    else:
        h.update(type(obj).__name__.encode())
        w = getattr(obj, "weights", None)
        if w is not None:
            _fp_obj(h, w, depth + 1)


def fingerprint(*objs) -> str:
    h = hashlib.sha256()
    for o in objs:
        if isinstance(o, torch.nn.Module):
            for k, v in o.state_dict().items():
                h.update(k.encode())
                _fp_tensor(h, v)
        else:
            _fp_obj(h, o)
    return h.hexdigest()


def model_fingerprint(model) -> str:
    """Weights of the UNet plus the patches registered on the ModelPatcher (e.g. LoRAs loaded before)."""
    patches = getattr(model, "patches", {}) or {}
    topts = (getattr(model, "model_options", {}) or {}).get("transformer_options", {})
    return fingerprint(introspect.base_model(model).diffusion_model, {k: patches[k] for k in sorted(patches)},
                       sorted(map(str, topts.keys())))


# ----------------------------------------------------------------------------------------------------------------
# conditioning and class images

def encode_prompt(clip, text: str):
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond, pooled, tokens


def _conditioning(cond, pooled, family: str, res: int):
    extra = {"pooled_output": pooled}
    if family == "sdxl":
        extra.update(width=res, height=res, crop_w=0, crop_h=0, target_width=res, target_height=res)
    return [[cond, extra]]


def class_images(model, clip, vae, cfg: TrainConfig, latent_shape: tuple[int, int, int], cache_dir: str | None,
                 rank: int = 0, world: int = 1, barrier: Callable[[], None] | None = None):
    """(latents in VAE space [N, C, h, w], cache path, hit). Sampled by the frozen model with ComfyUI's sampler."""
    import comfy.sample

    fam = introspect.family(model, "model")
    cond, pooled, _ = encode_prompt(clip, cfg.class_prompt)
    ncond, npooled, _ = encode_prompt(clip, "")
    key = {"model": model_fingerprint(model), "prompt": cfg.class_prompt, "count": cfg.num_class_images,
           "seed": cfg.seed, "cond": fingerprint(cond, pooled), "negative": fingerprint(ncond, npooled),
           "vae": fingerprint(vae.first_stage_model), "resolution": cfg.resolution, "latent": list(latent_shape),
           "steps": cfg.class_steps, "cfg": cfg.class_cfg, "sampler": cfg.class_sampler,
           "scheduler": cfg.class_scheduler}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = os.path.join(cache_dir, f"class_{digest}.safetensors") if cache_dir else None
    if path and os.path.isfile(path):
        sd, meta = load_safetensors(path)
        if sd.get("latents") is not None and sd["latents"].shape[0] == cfg.num_class_images:
            LOG.info("DreamBooth: reusing %d cached class images %s", cfg.num_class_images, path)
            return sd["latents"].float(), path, True
    if rank == 0 or path is None:
        LOG.info("DreamBooth: sampling %d class images for %r (%d steps, %s)", cfg.num_class_images, cfg.class_prompt,
                 cfg.class_steps, cfg.class_sampler)
        positive = _conditioning(cond, pooled, fam, cfg.resolution)
        negative = _conditioning(ncond, npooled, fam, cfg.resolution)
        empty = torch.zeros((cfg.num_class_images,) + tuple(latent_shape))
        noise = comfy.sample.prepare_noise(empty, cfg.seed)
        chunks = []
        for i in range(0, cfg.num_class_images, max(1, cfg.class_batch)):
            sl = slice(i, i + max(1, cfg.class_batch))
            chunks.append(comfy.sample.sample(model, noise[sl], cfg.class_steps, cfg.class_cfg, cfg.class_sampler,
                                              cfg.class_scheduler, positive, negative, empty[sl], seed=cfg.seed + i,
                                              disable_pbar=True).float().cpu())
        latents = torch.cat(chunks)
        if path:
            pixels = vae.decode(latents).float().cpu().clamp(0, 1)
            pixels = pixels.reshape(-1, *pixels.shape[-3:])
            save_atomic({"latents": latents, "images": (pixels * 255).round().to(torch.uint8)}, path,
                        {"personalize.technique": "dreambooth class images", "key": key})
            _write_pngs(pixels, path[: -len(".safetensors")])
    if world > 1 and path is not None:
        barrier()
        if rank != 0:
            sd, _ = load_safetensors(path)
            latents = sd["latents"].float()
    return latents, path, False


def _write_pngs(pixels: torch.Tensor, folder: str) -> None:
    """The class images as PNGs next to the cache file, so users can look at what the prior loss pulls toward."""
    import numpy as np
    from PIL import Image

    try:
        os.makedirs(folder, exist_ok=True)
        for i, p in enumerate(pixels):
            Image.fromarray((p.numpy() * 255).round().astype(np.uint8)).save(os.path.join(folder, f"{i:04d}.png"))
    except OSError as e:  # the cache file is what training uses; PNGs are a convenience
        LOG.warning("DreamBooth: could not write class PNGs: %s", e)


# ----------------------------------------------------------------------------------------------------------------
# the trainable step

def _repeat_tokens(ctxs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Bring contexts of different token counts (long prompts) to one length the way ComfyUI batches conds:
    repeat along tokens to the LCM (attention over k copies of every token is the same attention)."""
    lens = [c.shape[1] for c in ctxs]
    if len(set(lens)) == 1:
        return ctxs
    m = 1
    for n in lens:
        m = m * n // math.gcd(m, n)
    return [c.repeat(1, m // c.shape[1], 1) for c in ctxs]


class DreamBoothStep(torch.nn.Module):
    """UNet copy with LoRA (+ optional text encoder copy with LoRA). ``forward(x_t, t, n_inst, n_cls)`` is the
    prediction for a batch of ``n_inst`` instance rows followed by ``n_cls`` class rows."""

    def __init__(self, base_model, unet, te, texts, fixed, family, resolution, clip_layer=None):
        super().__init__()
        self.unet = unet
        self.te = te
        self._base = [base_model]  # not a submodule: its weights are not ours
        self.texts = texts  # {"inst": tokens, "cls": tokens}
        self.fixed = fixed  # {"inst": (cond, pooled), "cls": (cond, pooled)} when the text encoder is frozen
        self.family = family
        self.resolution = resolution
        self.clip_layer = clip_layer

    def _encode(self, which: str):
        if self.te is None:
            return self.fixed[which]
        self.te.reset_clip_options()
        if self.clip_layer is not None:
            self.te.set_clip_options({"layer": self.clip_layer})
        o = self.te.encode_token_weights(self.texts[which])
        return o[0], o[1]

    def forward(self, x_t, t, n_inst: int, n_cls: int):
        parts = [("inst", n_inst), ("cls", n_cls)]
        encoded = [self._encode(w) for w, n in parts if n > 0]
        counts = [n for _, n in parts if n > 0]
        ctxs = _repeat_tokens([c for c, _ in encoded])
        dev = x_t.device
        context = torch.cat([c.to(dev).expand(n, -1, -1) for c, n in zip(ctxs, counts)])
        y = None
        if self.family == "sdxl":
            bm = self._base[0]
            r = self.resolution
            y = torch.cat([bm.encode_adm(pooled_output=p.to(dev), width=r, height=r, crop_w=0, crop_h=0,
                                         target_width=r, target_height=r).to(dev).expand(n, -1)
                           for (_, p), n in zip(encoded, counts)])
        return self.unet(x_t, t.float(), context=context.to(x_t.dtype), y=None if y is None else y.to(x_t.dtype),
                         transformer_options={})


def _checkpointed(module: torch.nn.Module) -> None:
    """Gradient checkpointing on the ResBlocks and SpatialTransformers of a (copied) UNet."""
    import torch.utils.checkpoint as cp
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    for m in module.modules():
        if isinstance(m, (ResBlock, SpatialTransformer)):
            fwd = m.forward

            def run(*args, _f=fwd, **kwargs):
                if not torch.is_grad_enabled():
                    return _f(*args, **kwargs)
                return cp.checkpoint(_f, *args, use_reentrant=False, **kwargs)

            m.forward = run


def _mix(*xs: int) -> int:
    h = hashlib.blake2b(repr(xs).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class _Stream:
    """Example indices for a stream of samples: epoch e is a seeded permutation; sample i -> perm[i % n]."""

    def __init__(self, n: int, seed: int, tag: int):
        self.n, self.seed, self.tag, self._perm = n, seed, tag, {}

    def take(self, start: int, count: int) -> torch.Tensor:
        out = []
        for i in range(start, start + count):
            e = i // self.n
            if e not in self._perm:
                self._perm = {e: torch.randperm(self.n, generator=torch.Generator().manual_seed(
                    _mix(self.seed, self.tag, e)))}
            out.append(int(self._perm[e][i % self.n]))
        return torch.tensor(out, dtype=torch.long)


def step_batch(step: int, cfg: TrainConfig, inst: torch.Tensor, cls: torch.Tensor | None, sigmas: torch.Tensor,
               world: int, rank: int, streams) -> dict:
    """The global batch of step ``step`` (deterministic in (seed, step)), sliced for ``rank``."""
    b = cfg.batch_size
    B = b * world
    g = torch.Generator().manual_seed(_mix(cfg.seed, 7, step))
    ii = streams[0].take(step * B, B)
    x_inst = inst[ii]
    n_cls = 0
    if cls is not None:
        ci = streams[1].take(step * B, B)
        x0 = torch.cat([x_inst, cls[ci]])
        n_cls = B
    else:
        x0 = x_inst
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, sigmas.shape[0], (x0.shape[0],), generator=g)
    lo, hi = rank * b, (rank + 1) * b
    keep = torch.cat([torch.arange(lo, hi), torch.arange(B + lo, B + hi)]) if n_cls else torch.arange(lo, hi)
    return {"x0": x0[keep], "noise": noise[keep], "t": t[keep], "n_inst": b, "n_cls": b if n_cls else 0}


def dreambooth_loss(step_module, batch: dict, sigmas: torch.Tensor, v_prediction: bool, prior_loss_weight: float,
                    device, autocast_dtype=None):
    """(total, instance MSE, prior MSE or None). DDPM forward process from the model's own sigmas:
    alpha_bar = 1 / (1 + sigma^2); x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps."""
    x0 = _to_device(batch["x0"], device).float()
    noise = _to_device(batch["noise"], device).float()
    t = _to_device(batch["t"], device)
    sig = sigmas.to(device, torch.float32)[t].view(-1, 1, 1, 1)
    ab = 1.0 / (1.0 + sig * sig)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    target = ab.sqrt() * noise - (1 - ab).sqrt() * x0 if v_prediction else noise
    n_inst, n_cls = batch["n_inst"], batch["n_cls"]
    if autocast_dtype is not None:
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype):
            pred = step_module(x_t, t, n_inst, n_cls)
    else:
        pred = step_module(x_t.to(_param_dtype(step_module)), t, n_inst, n_cls)
    pred = pred.float()
    inst_loss = torch.nn.functional.mse_loss(pred[:n_inst], target[:n_inst])
    if n_cls:
        prior = torch.nn.functional.mse_loss(pred[n_inst:], target[n_inst:])
        return inst_loss + prior_loss_weight * prior, inst_loss, prior
    return inst_loss, inst_loss, None


def _to_device(x: torch.Tensor, device) -> torch.Tensor:
    """Host -> GPU without a stream sync (a copy from pageable memory would wait for the queue to drain)."""
    if torch.device(device).type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _param_dtype(m) -> torch.dtype:
    m = getattr(m, "module", m)
    for p in m.unet.parameters():
        if not p.requires_grad and p.is_floating_point():
            return p.dtype
    return torch.float32


# ----------------------------------------------------------------------------------------------------------------
# distributed

def dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------------
# resume files

def resume_path(save_path: str) -> str:
    return save_path[: -len(".safetensors")] + RESUME_SUFFIX


def check_resume_family(path: str, family: str) -> dict | None:
    """Metadata of a resume file, or None; InputError if it was trained on another model family."""
    if not os.path.isfile(path):
        return None
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001
        raise InputError("save_name", "a readable resume checkpoint", f"{path}: {e}",
                         hint="delete the .resume file or set resume to false") from e
    theirs = meta.get("personalize.family")
    if theirs != family:
        raise InputError("model", f"an {introspect.FAMILY_NAMES.get(theirs, theirs)} model (the family the resume "
                         f"checkpoint {os.path.basename(path)} was trained on)",
                         f"an {introspect.FAMILY_NAMES[family]} model",
                         hint="use another save_name, delete the .resume file or set resume to false")
    return meta


def _resume_signature(cfg: TrainConfig, family: str, world: int, data_fp: str) -> dict:
    keep = ("instance_prompt", "class_prompt", "num_class_images", "prior_loss_weight", "rank", "alpha",
            "learning_rate", "text_encoder_lr", "resolution", "seed", "train_text_encoder", "targets",
            "training_dtype", "weight_decay", "max_grad_norm")
    sig = {k: getattr(cfg, k) for k in keep}
    sig.update(family=family, global_batch=cfg.batch_size * world, data=data_fp)
    return sig


# ----------------------------------------------------------------------------------------------------------------
# the loop

def _autocast_dtype(name: str, device) -> torch.dtype | None:
    dev = torch.device(device).type
    if name == "fp32" or (name == "auto" and dev == "cpu"):
        return None
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        return torch.float16
    return torch.bfloat16 if (dev == "cuda" and torch.cuda.is_bf16_supported()) else torch.float16


def unet_layer_names(model, targets: str) -> dict[str, str]:
    bm = introspect.base_model(model)
    return lora.unet_target_names(bm.diffusion_model, bm.model_config.unet_config, targets)


def build_trainable(model, clip, cfg: TrainConfig, names: dict, te_names: dict, conds: dict, tokens: dict,
                    autocast_dtype=None):
    """(DreamBoothStep, {kohya key: LoRA module}, UNet LoRA params, text-encoder LoRA params) over copies of the
    model's UNet (and text encoder): the model and clip passed in are not modified."""
    fam = introspect.family(model, "model")
    bm = introspect.base_model(model)
    weight_dtype = torch.float32 if autocast_dtype is None else None
    with torch.inference_mode(False):
        unet = lora.trainable_copy(bm.diffusion_model, weight_dtype)
        unet_mods = lora.inject(unet, names, cfg.rank, cfg.alpha, cfg.seed)
        te, te_mods = None, {}
        if te_names:
            clip.load_model()
            te = lora.trainable_copy(clip.cond_stage_model, weight_dtype)
            te_mods = lora.inject(te, te_names, cfg.rank, cfg.alpha, _mix(cfg.seed, 1))
            out_of_place_clip(te)
        if cfg.gradient_checkpointing:
            _checkpointed(unet)
        fixed = {k: (c.float().clone(), None if p is None else p.float().clone()) for k, (c, p) in conds.items()}
        step_mod = DreamBoothStep(bm, unet, te, tokens, fixed, fam, cfg.resolution,
                                  getattr(clip, "layer_idx", None) if clip is not None else None)
    modules = dict(unet_mods)
    modules.update(te_mods)
    params_unet = [p for m in unet_mods.values() for p in (m.lora_down, m.lora_up)]
    params_te = [p for m in te_mods.values() for p in (m.lora_down, m.lora_up)]
    return step_mod, modules, params_unet, params_te



def train(model, clip, vae, images, cfg: TrainConfig, save_path: str, cache_dir: str | None = None, *,
          overwrite: bool = False, resume: bool = True,
          on_step: Callable[[int, int, float, float | None], None] | None = None,
          check_interrupt: Callable[[], None] | None = None) -> TrainResult:
    """Train a DreamBooth LoRA and write it (kohya format) to ``save_path``. Every input is validated before any
    heavy work. Under torch.distributed each rank calls this with the same arguments; rank 0 writes files."""
    import comfy.model_management as mm

    rank, world = dist_info()
    validate_config(cfg)
    images = as_image_list(images, "instance_images")
    fam = introspect.family(model, "model")
    names = unet_layer_names(model, cfg.targets)
    lora.check_rank(introspect.base_model(model).diffusion_model, names, cfg.rank)
    te_names = {}
    if cfg.train_text_encoder:
        require(clip is not None, "clip", "a CLIP model when train_text_encoder is on", None)
        te_names = lora.text_encoder_target_names(clip.cond_stage_model, fam)
        lora.check_rank(clip.cond_stage_model, te_names, cfg.rank)
    require(save_path.endswith(".safetensors"), "save_name", "a .safetensors path", save_path)
    if os.path.exists(save_path) and not overwrite:
        raise InputError("save_name", "a name that does not exist yet", save_path,
                         hint="choose another save_name or set overwrite to true")
    rpath = resume_path(save_path)
    resume_meta = check_resume_family(rpath, fam) if resume else None

    with torch.inference_mode(False), torch.no_grad():
        # ---- data (no autograd: the frozen models may hold weights that require grad). Load the model first: clones
        # share one BaseModel, whose weights hold the patches of whichever clone was loaded last.
        mm.load_models_gpu([model], force_full_load=True)
        pixels = prepare_pixels(images, cfg.resolution)
        bm = introspect.base_model(model)
        raw = vae.encode(pixels).float().cpu()
        inst = bm.process_latent_in(raw).float().clone()
        data_fp = fingerprint(inst)
        cond_i, pooled_i, tok_i = encode_prompt(clip, cfg.instance_prompt)
        cond_c, pooled_c, tok_c = encode_prompt(clip, cfg.class_prompt)
        cls = None
        cache_file, cache_hit = None, False
        if cfg.prior_loss_weight > 0:
            cls_raw, cache_file, cache_hit = class_images(model, clip, vae, cfg, tuple(raw.shape[1:]), cache_dir,
                                                          rank, world, _barrier)
            cls = bm.process_latent_in(cls_raw).float().clone()

    with torch.inference_mode(False), torch.enable_grad():
        start = 0
        losses: list = []
        sig = _resume_signature(cfg, fam, world, data_fp)
        state = None
        if resume_meta is not None:
            old = json.loads(resume_meta.get("personalize.signature", "{}"))
            diff = sorted(k for k in set(old) | set(sig) if old.get(k) != sig.get(k))
            if diff:
                raise InputError("save_name", f"settings matching the resume checkpoint {os.path.basename(rpath)}",
                                 "different " + ", ".join(diff),
                                 hint="use another save_name, delete the .resume file or set resume to false")
            state, _ = load_safetensors(rpath)
            start = int(resume_meta["personalize.step"])
            losses = [tuple(x) for x in json.loads(resume_meta.get("personalize.losses", "[]"))]
            require(start < cfg.steps, "steps", f"more than the {start} steps already in the resume checkpoint",
                    cfg.steps)

        # ---- models
        mm.load_models_gpu([model], force_full_load=True)
        device = model.load_device
        ac = _autocast_dtype(cfg.training_dtype, device)
        step_mod, modules, params_unet, params_te = build_trainable(
            model, clip, cfg, names, te_names, {"inst": (cond_i, pooled_i), "cls": (cond_c, pooled_c)},
            {"inst": tok_i, "cls": tok_c}, ac)
        groups = [{"params": params_unet, "lr": cfg.learning_rate}]
        if params_te:
            groups.append({"params": params_te, "lr": cfg.text_encoder_lr})
        cuda = torch.device(device).type == "cuda"
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8,
                                **({"fused": True} if cuda else {}))
        scaler = torch.amp.GradScaler(torch.device(device).type) if ac == torch.float16 else None
        if state is not None:
            lora.load_into(modules, {k[5:]: v for k, v in state.items() if k.startswith("lora.")}, "save_name")
            _load_opt(opt, state, params_unet + params_te)
        runner = step_mod
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            frozen = [n for n, p in step_mod.named_parameters() if not p.requires_grad]
            frozen += [n for n, _ in step_mod.named_buffers()]
            DDP._set_params_and_buffers_to_ignore_for_model(step_mod, frozen)
            runner = DDP(step_mod, device_ids=[device.index] if torch.device(device).type == "cuda" else None)

        ms = model.get_model_object("model_sampling")
        sigmas = ms.sigmas.detach().float().cpu().clone()
        import comfy.model_sampling as cms

        vpred = isinstance(ms, cms.V_PREDICTION)
        streams = (_Stream(inst.shape[0], cfg.seed, 1), _Stream(cls.shape[0], cfg.seed, 2) if cls is not None else None)
        all_params = params_unet + params_te
        sigmas_dev = sigmas.to(device)
        t0 = time.time()
        lazy = cuda  # on CPU a sync costs nothing: report every step
        pending: list = []
        for step in range(start, cfg.steps):
            if check_interrupt is not None:
                check_interrupt()
            batch = step_batch(step, cfg, inst, cls, sigmas, world, rank, streams)
            opt.zero_grad(set_to_none=True)
            loss, li, lp = dreambooth_loss(runner, batch, sigmas_dev, vpred, cfg.prior_loss_weight, device, ac)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(all_params, cfg.max_grad_norm)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            done = step + 1
            pending.append((done, li.detach(), None if lp is None else lp.detach()))
            ckpt = bool(cfg.checkpoint_every) and done % cfg.checkpoint_every == 0 and done < cfg.steps
            if not lazy or ckpt or done == cfg.steps or len(pending) >= SYNC_EVERY:
                # one host sync (and one all_reduce) per flush, not per step: on a launch-bound GPU every .item()
                # stalls the queue
                for s_, li_v, lp_v in _flush(pending, world):
                    losses.append((s_, li_v, lp_v))
                    if on_step is not None:
                        on_step(s_, cfg.steps, li_v, lp_v)
                pending = []
            if ckpt and rank == 0:
                _save_resume(rpath, modules, opt, all_params, done, sig, losses, fam)
        LOG.info("DreamBooth: %d steps in %.1fs", cfg.steps - start, time.time() - t0)

        sd = lora.state_dict(modules)
        meta = training_metadata(cfg, fam, world, os.path.basename(save_path), start, cache_hit)
        if rank == 0:
            save_atomic(sd, save_path, meta)
            if os.path.exists(rpath):
                os.unlink(rpath)
        _barrier()
        del runner, step_mod, opt
        mm.soft_empty_cache()
    return TrainResult(save_path, sd, meta, losses, start, cache_file, cache_hit)


SYNC_EVERY = 10


def _flush(pending: list, world: int) -> list:
    """[(step, instance loss, prior loss or None)] as floats, averaged over ranks: one all_reduce, one sync."""
    if not pending:
        return []
    has_prior = pending[0][2] is not None
    x = torch.stack([torch.stack([a.float(), (b if has_prior else a).float()]) for _, a, b in pending])
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(x)
        x = x / world
    vals = x.cpu().tolist()
    return [(s, v[0], v[1] if has_prior else None) for (s, _, _), v in zip(pending, vals)]


def _save_resume(path, modules, opt, params, step, sig, losses, family) -> None:
    tensors = {f"lora.{k}": v for k, v in lora.state_dict(modules).items()}
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                tensors[f"opt.{i}.{k}"] = st[k]
        if "step" in st:
            tensors[f"opt.{i}.step"] = torch.as_tensor(st["step"]).reshape(1).float()
    meta = {"personalize.step": str(step), "personalize.signature": json.dumps(sig, sort_keys=True),
            "personalize.losses": json.dumps(losses), "personalize.family": family,
            "personalize.technique": "dreambooth-lora resume checkpoint"}
    save_atomic(tensors, path, meta)


def _load_opt(opt, state, params) -> None:
    for i, p in enumerate(params):
        if f"opt.{i}.exp_avg" not in state:
            continue
        opt.state[p] = {"exp_avg": state[f"opt.{i}.exp_avg"].to(p.device, p.dtype).clone(),
                        "exp_avg_sq": state[f"opt.{i}.exp_avg_sq"].to(p.device, p.dtype).clone(),
                        "step": state[f"opt.{i}.step"].reshape(()).clone()}


def training_metadata(cfg: TrainConfig, family: str, world: int, name: str, resumed_from: int,
                      cache_hit: bool) -> dict:
    """kohya-style ``ss_*`` keys (read by A1111 / kohya tools), a modelspec header and the pack's own keys."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(cfg.alpha),
        "ss_network_args": json.dumps({"targets": cfg.targets}),
        "ss_base_model_version": FAMILY_VERSION[family],
        "ss_v2": str(family == "sd2"),
        "ss_training_comment": f"DreamBooth LoRA with prior preservation (Personalize ComfyUI pack): "
                               f"{cfg.instance_prompt!r} / {cfg.class_prompt!r}",
        "ss_steps": str(cfg.steps),
        "ss_max_train_steps": str(cfg.steps),
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_unet_lr": str(cfg.learning_rate),
        "ss_text_encoder_lr": str(cfg.text_encoder_lr if cfg.train_text_encoder else 0.0),
        "ss_network_train_unet_only": str(not cfg.train_text_encoder),
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_total_batch_size": str(cfg.batch_size * world),
        "ss_num_processes": str(world),
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_seed": str(cfg.seed),
        "ss_prior_loss_weight": str(cfg.prior_loss_weight),
        "ss_num_reg_images": str(cfg.num_class_images if cfg.prior_loss_weight > 0 else 0),
        "ss_mixed_precision": cfg.training_dtype,
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_optimizer": f"torch.optim.AdamW(weight_decay={cfg.weight_decay},betas=(0.9, 0.999),eps=1e-08)",
        "ss_max_grad_norm": str(cfg.max_grad_norm),
        "ss_lr_scheduler": "constant",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCH[family],
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family == "sdxl"
        else "diffusers",
        "modelspec.title": os.path.splitext(name)[0],
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        "personalize.technique": "dreambooth-lora",
        "personalize.family": family,
        "personalize.config": json.dumps(dataclasses.asdict(cfg), sort_keys=True),
        "personalize.resumed_from_step": str(resumed_from),
        "personalize.class_images_cached": str(cache_hit),
    }


# ----------------------------------------------------------------------------------------------------------------
# loss curve

def loss_curve_image(losses, width: int = 512, height: int = 256) -> torch.Tensor:
    """IMAGE [1, H, W, 3]: instance loss (blue) and prior loss (orange) per step, raw (faint) and smoothed."""
    import numpy as np
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    pad = 28
    d.rectangle([pad, 8, width - 8, height - pad], outline=(160, 160, 160))
    series = [([l[1] for l in losses], (40, 90, 200)),
              ([l[2] for l in losses if l[2] is not None], (230, 130, 30))]
    vals = [v for s, _ in series for v in s if v is not None and math.isfinite(v)]
    if vals:
        lo, hi = min(vals), max(vals)
        hi = hi if hi > lo else lo + 1e-8
        n = max(len(losses), 2)

        def pt(i, v):
            return (pad + (width - 8 - pad) * i / (n - 1), height - pad - (height - pad - 8) * (v - lo) / (hi - lo))

        for s, col in series:
            if len(s) < 2:
                continue
            faint = tuple(int(c + (255 - c) * 0.7) for c in col)
            d.line([pt(i, v) for i, v in enumerate(s)], fill=faint, width=1)
            k = max(1, len(s) // 20)
            sm = [sum(s[max(0, i - k + 1): i + 1]) / len(s[max(0, i - k + 1): i + 1]) for i in range(len(s))]
            d.line([pt(i, v) for i, v in enumerate(sm)], fill=col, width=2)
        d.text((pad + 4, 10), f"instance loss (blue), prior loss (orange)   max {hi:.4g}", fill=(0, 0, 0))
        d.text((pad + 4, height - pad + 6), f"step 1 .. {len(losses)}   min {lo:.4g}", fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).unsqueeze(0)
