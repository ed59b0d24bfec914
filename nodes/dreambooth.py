"""DreamBooth-LoRA training loop on ComfyUI's own models (papers.md §D; comfyui-host.md §2).

One loop for the node and the CLI (``scripts/train_dreambooth.py``), single process or under ``torchrun`` with
DistributedDataParallel:

- data: instance photos -> center crop + resize -> VAE -> latents; class images sampled by the *frozen* base model
  with ComfyUI's sampler (``comfy.sample.sample``), cached on disk under a hash of model + prompt + count + seed (+
  sampler settings), so a second run reuses them;
- loss (diffusers' pairing, DreamBooth Eq. 2): one forward over [instance examples; class examples], the prediction
  split in two, ``MSE(instance) + prior_loss_weight * MSE(class)``; t ~ U{0..999}, noise, noisy latent and the eps
  or v target from the model's own ``model_sampling`` (``nodes/forward_process.py``), the UNet called through
  ComfyUI's ``apply_model`` / ``extra_conds`` path (``training_engine.UNetCall``);
- LoRA on a ``frozen_copy`` of the UNet (``nodes/frozen_weights.py``): new module objects over the model's own weight
  storage, no second UNet in memory; the input model is never modified;
- the loop is the pack's training engine (``nodes/training_engine.py``): AdamW, clipping, accumulation, mixed
  precision, DDP, checkpoints every ``checkpoint_every`` steps and on cancel in ``<save>.resume``, exact resume,
  progress, NaN stop;
- determinism: everything random in step s (which examples, noise, timesteps) comes from generators seeded by
  (seed, s) over the *global* batch; each DDP rank / accumulation micro-batch takes its part. A resumed run therefore
  replays the exact stream, and N ranks x batch b equals 1 rank with N micro-batches of b (bit for bit) and 1 rank
  with batch N*b (up to float summation order);
- files: the final kohya file (and the class-image cache) through the engine's one save path (finite check, then
  an atomic write); the resume file is removed at the end.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import introspect, lora
from .trainable import out_of_place_clip
from .images import prepare_pixels  # noqa: F401  (re-exported: the CLI and tests use dreambooth.prepare_pixels)
from .errors import InputError, require
from .forward_process import LOSS_WEIGHTINGS, sample_timesteps
from .training_engine import (TRAINING_DTYPES, fingerprint, optimizer_description, sanitize_save_name,  # noqa: F401
                              save_file, save_path_for)
from .validation import check_image
from .weights_io import load as load_safetensors

LOG = logging.getLogger("personalize.dreambooth")
FAMILY_VERSION = {"sd15": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCH = {"sd15": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-512/lora",
                  "sdxl": "stable-diffusion-xl-v1-base/lora"}
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
    grad_accumulation: int = 1  # micro-batches per optimizer step: the global batch is batch_size x world x this
    loss_weighting: str = "none"  # forward_process.LOSS_WEIGHTINGS: per-row MSE weight by noise level


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
    require(cfg.checkpoint_every >= 0, "checkpoint_every", "0 (only on interrupt) or a number of steps",
            cfg.checkpoint_every)
    require(cfg.grad_accumulation >= 1, "grad_accumulation", "at least 1", cfg.grad_accumulation)
    require(cfg.loss_weighting in LOSS_WEIGHTINGS, "loss_weighting", f"one of {LOSS_WEIGHTINGS}", cfg.loss_weighting)
    require("{class}" not in cfg.instance_prompt and "{class}" not in cfg.class_prompt, "instance_prompt",
            "prompts with {class} already filled in", cfg.instance_prompt)


def fill_class(prompt: str, class_noun: str) -> str:
    return prompt.replace("{class}", class_noun.strip())


# ----------------------------------------------------------------------------------------------------------------
# fingerprints (cache keys, resume checks)

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
            save_file({"latents": latents, "images": (pixels * 255).round().to(torch.uint8)}, path,
                      {"personalize.technique": "dreambooth class images", "key": key}, "class images")
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

class DreamBoothStep(torch.nn.Module):
    """The engine's module: the UNet (frozen weights aliased, LoRA wrappers) called through ComfyUI's own model path
    (``training_engine.UNetCall``), plus the optional text-encoder copy with LoRA. ``forward(batch)`` is the loss of
    a batch of ``n_inst`` instance rows followed by ``n_cls`` class rows (diffusers' pairing, DreamBooth Eq. 2):
    ``MSE(instance) + prior_loss_weight * MSE(class)``, on the model's own target (eps or v); with a
    ``loss_weighting`` other than "none" each row's MSE is weighted by its noise level
    (``forward_process.loss_weight``) before the mean."""

    def __init__(self, base_model, unet, te, texts, fixed, family, resolution, clip_layer=None,
                 prior_loss_weight: float = 1.0, loss_weighting: str = "none"):
        super().__init__()
        from .training_engine import UNetCall

        self.unet = unet
        self.te = te
        self._call = [UNetCall(base_model, unet)]  # not a submodule: the shell shares the base model's modules
        self.model_sampling = base_model.model_sampling
        self.texts = texts  # {"inst": tokens, "cls": tokens}
        self.fixed = fixed  # {"inst": (cond, pooled), "cls": (cond, pooled)} when the text encoder is frozen
        self.family = family
        self.resolution = resolution
        self.clip_layer = clip_layer
        self.prior_loss_weight = float(prior_loss_weight)
        self.loss_weighting = loss_weighting

    def _encode(self, which: str):
        if self.te is None:
            return self.fixed[which]
        self.te.reset_clip_options()
        if self.clip_layer is not None:
            self.te.set_clip_options({"layer": self.clip_layer})
        o = self.te.encode_token_weights(self.texts[which])
        return o[0], o[1]

    def conditioning(self, which: str, device):
        cond, pooled = self._encode(which)
        extras = {"pooled_output": None if pooled is None else pooled.to(device)}
        if self.family == "sdxl":
            r = self.resolution
            extras.update(width=r, height=r, crop_w=0, crop_h=0, target_width=r, target_height=r)
        return cond.to(device), extras

    def predict(self, x_noisy, sigma, n_inst: int, n_cls: int):
        """The network output (eps / v) for ``n_inst`` instance rows then ``n_cls`` class rows."""
        parts = [(w, n) for w, n in (("inst", n_inst), ("cls", n_cls)) if n > 0]
        conds = [self.conditioning(w, x_noisy.device) for w, _ in parts]
        return self._call[0](x_noisy, sigma, conds, [n for _, n in parts])

    def forward(self, batch: dict) -> dict:
        from . import forward_process as fp
        from .training_engine import to_device

        dev = next(p for p in self.parameters() if p.requires_grad).device
        x0 = to_device(batch["x0"], dev).float()
        noise = to_device(batch["noise"], dev).float()
        sigma = to_device(batch["sigma"], dev).float()
        ms = self.model_sampling
        pred = self.predict(fp.noisy(ms, sigma, x0, noise), sigma, batch["n_inst"], batch["n_cls"]).float()
        target = fp.target(ms, sigma, x0, noise)
        n_inst, n_cls = batch["n_inst"], batch["n_cls"]
        if self.loss_weighting == "none":
            def mse(a, b, _):
                return torch.nn.functional.mse_loss(a, b)
        else:
            w = fp.loss_weight(ms, sigma, self.loss_weighting).to(pred.dtype)

            def mse(a, b, rows):
                return (((a - b) ** 2).mean(dim=tuple(range(1, a.ndim))) * w[rows]).mean()
        inst = mse(pred[:n_inst], target[:n_inst], slice(0, n_inst))
        if n_cls:
            prior = mse(pred[n_inst:], target[n_inst:], slice(n_inst, None))
            return {"loss": inst + self.prior_loss_weight * prior, "instance": inst, "prior": prior}
        return {"loss": inst, "instance": inst}


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
               parts: int, part: int, streams) -> dict:
    """Part ``part`` of ``parts`` of the global batch of step ``step`` (deterministic in (seed, step)); a part is
    ``cfg.batch_size`` instance rows (+ as many class rows), the global batch ``parts`` times that."""
    b = cfg.batch_size
    B = b * parts
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
    t = sample_timesteps(sigmas, x0.shape[0], g)
    lo, hi = part * b, (part + 1) * b
    keep = torch.cat([torch.arange(lo, hi), torch.arange(B + lo, B + hi)]) if n_cls else torch.arange(lo, hi)
    return {"x0": x0[keep], "noise": noise[keep], "t": t[keep], "sigma": sigmas[t[keep]], "n_inst": b,
            "n_cls": b if n_cls else 0}


class DreamBoothTrainer:
    """The trainer the engine runs: the step module, the LoRA parameter groups, the batch stream."""

    def __init__(self, module, params_unet, params_te, cfg: TrainConfig, inst, cls, sigmas):
        from .training_engine import ParamGroup

        self.module = module
        self.groups = [ParamGroup("unet", params_unet, cfg.learning_rate)]
        if params_te:
            self.groups.append(ParamGroup("text_encoder", params_te, cfg.text_encoder_lr))
        self.cfg, self.inst, self.cls, self.sigmas = cfg, inst, cls, sigmas
        self.streams = (_Stream(inst.shape[0], cfg.seed, 1),
                        _Stream(cls.shape[0], cfg.seed, 2) if cls is not None else None)

    def param_groups(self):
        return self.groups

    def batch(self, step: int, part: int, parts: int) -> dict:
        return step_batch(step, self.cfg, self.inst, self.cls, self.sigmas, parts, part, self.streams)


def engine_config(cfg: TrainConfig):
    from .training_engine import EngineConfig

    return EngineConfig(steps=cfg.steps, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8,
                        max_grad_norm=cfg.max_grad_norm, grad_accumulation=cfg.grad_accumulation,
                        training_dtype=cfg.training_dtype, checkpoint_every=cfg.checkpoint_every,
                        log_every=SYNC_EVERY)


# ----------------------------------------------------------------------------------------------------------------
# resume files

def resume_path(save_path: str) -> str:
    from .training_engine import checkpoint_path

    return checkpoint_path(save_path)


def check_resume_family(path: str, family: str) -> dict | None:
    from .training_engine import check_resume_family as check

    return check(path, family)


def _resume_signature(cfg: TrainConfig, family: str, world: int, data_fp: str) -> dict:
    keep = ("instance_prompt", "class_prompt", "num_class_images", "prior_loss_weight", "rank", "alpha",
            "learning_rate", "text_encoder_lr", "resolution", "seed", "train_text_encoder", "targets",
            "training_dtype", "weight_decay", "max_grad_norm")
    sig = {k: getattr(cfg, k) for k in keep}
    if cfg.loss_weighting != "none":   # (so that resume files written before the option existed stay valid)
        sig["loss_weighting"] = cfg.loss_weighting
    sig.update(family=family, global_batch=cfg.batch_size * world * cfg.grad_accumulation, data=data_fp)
    return sig


# ----------------------------------------------------------------------------------------------------------------
# the run

def unet_layer_names(model, targets: str) -> dict[str, str]:
    bm = introspect.base_model(model)
    return lora.unet_target_names(bm.diffusion_model, bm.model_config.unet_config, targets)


def build_trainable(model, clip, cfg: TrainConfig, names: dict, te_names: dict, conds: dict, tokens: dict,
                    autocast_dtype=None):
    """(DreamBoothStep, {kohya key: LoRA module}, UNet LoRA params, text-encoder LoRA params). The step's UNet (and
    text encoder) are ``frozen_copy``s: new module objects over the model's own weight storage (no copy), LoRA
    wrappers on the copy only; the model and clip passed in are not modified."""
    from .frozen_weights import frozen_copy

    fam = introspect.family(model, "model")
    bm = introspect.base_model(model)
    weight_dtype = torch.float32 if autocast_dtype is None else None
    with torch.inference_mode(False):
        unet, _ = frozen_copy(bm.diffusion_model, (), frozen_dtype=weight_dtype)
        unet_mods = lora.inject(unet, names, cfg.rank, cfg.alpha, cfg.seed)
        te, te_mods = None, {}
        if te_names:
            clip.load_model()
            te, _ = frozen_copy(clip.cond_stage_model, (), frozen_dtype=weight_dtype)
            te_mods = lora.inject(te, te_names, cfg.rank, cfg.alpha, _mix(cfg.seed, 1))
            out_of_place_clip(te)
        if cfg.gradient_checkpointing:
            _checkpointed(unet)
        fixed = {k: (c.float().clone(), None if p is None else p.float().clone()) for k, (c, p) in conds.items()}
        step_mod = DreamBoothStep(bm, unet, te, tokens, fixed, fam, cfg.resolution,
                                  getattr(clip, "layer_idx", None) if clip is not None else None,
                                  cfg.prior_loss_weight, cfg.loss_weighting)
    modules = dict(unet_mods)
    modules.update(te_mods)
    params_unet = [p for m in unet_mods.values() for p in (m.lora_down, m.lora_up)]
    params_te = [p for m in te_mods.values() for p in (m.lora_down, m.lora_up)]
    return step_mod, modules, params_unet, params_te


def train(model, clip, vae, images, cfg: TrainConfig, save_path: str, cache_dir: str | None = None, *,
          overwrite: bool = False, resume: bool = True,
          on_step: Callable[[int, int, float, float | None], None] | None = None,
          check_interrupt: Callable[[], None] | None = None, progress: bool = True) -> TrainResult:
    """Train a DreamBooth LoRA on the training engine and write it (kohya format) to ``save_path``. Every input is
    validated before any heavy work. Under torch.distributed each rank calls this with the same arguments; rank 0
    writes files."""
    import comfy.model_management as mm

    from . import training_engine as engine

    rank, world = engine.dist_info()
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
    if resume:
        check_resume_family(rpath, fam)

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
                                                          rank, world, engine.barrier)
            cls = bm.process_latent_in(cls_raw).float().clone()

    with torch.inference_mode(False), torch.enable_grad():
        mm.load_models_gpu([model], force_full_load=True)
        device = model.load_device
        ac = engine.autocast_dtype(cfg.training_dtype, device)
        step_mod, modules, params_unet, params_te = build_trainable(
            model, clip, cfg, names, te_names, {"inst": (cond_i, pooled_i), "cls": (cond_c, pooled_c)},
            {"inst": tok_i, "cls": tok_c}, ac)
        from .forward_process import training_sigmas

        trainer = DreamBoothTrainer(step_mod, params_unet, params_te, cfg, inst, cls,
                                    training_sigmas(model.get_model_object("model_sampling")))

        def on_log(step, total, d):
            if on_step is not None:
                on_step(step, total, d["instance"], d.get("prior"))

        res = engine.run(trainer, engine_config(cfg), device, checkpoint=rpath,
                         signature=_resume_signature(cfg, fam, world, data_fp), family=fam,
                         technique="dreambooth-lora", resume=resume, on_log=on_log, check_interrupt=check_interrupt,
                         progress=progress)
        sd = lora.state_dict(modules)
        meta = training_metadata(cfg, fam, world, os.path.basename(save_path), res.resumed_from, cache_hit)
        if rank == 0:
            engine.save_file(sd, save_path, meta, "LoRA")
        engine.remove_checkpoint(rpath)
        engine.barrier()
        del trainer, step_mod
        mm.soft_empty_cache()
    losses = [(s, d["instance"], d.get("prior")) for s, d in res.losses]
    return TrainResult(save_path, sd, meta, losses, res.resumed_from, cache_file, cache_hit)


SYNC_EVERY = 10


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
        "ss_min_snr_gamma": "5" if cfg.loss_weighting == "min_snr_5" else "None",
        "ss_debiased_estimation": str(cfg.loss_weighting == "debiased"),
        "ss_num_reg_images": str(cfg.num_class_images if cfg.prior_loss_weight > 0 else 0),
        "ss_mixed_precision": cfg.training_dtype,
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_optimizer": optimizer_description(engine_config(cfg)),  # the engine builds the one optimizer
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
    """IMAGE [1, H, W, 3]: instance loss (blue) and prior loss (orange) per step (the engine's loss curve)."""
    from .training_engine import loss_curve_image as curve

    rows = [(s, {"instance": i} if p is None else {"instance": i, "prior": p}) for s, i, p in losses]
    return curve(rows, ["instance", "prior"], width, height)
