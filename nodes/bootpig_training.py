"""BootPIG training (arXiv 2401.13974 §3.3-3.4, App. A; ``../shared/reference/papers.md`` §A2) on the pack's engine.

What trains (paper §3.3, Table 2; official ``train_bootpig.py``): the *whole reference UNet* (a copy of the base UNet,
initialised with its weights) and the base UNet's self-attention projections (``attn1`` q, k, v, out) in every
transformer block; everything else is frozen (aliased, never copied: ``nodes/frozen_weights.py``).

One training step, for a batch of (target, reference, caption) triplets from a bootstrap dataset
(``nodes/bootpig_data.py``):

1. target latent ``x0`` and reference latent ``r0`` (the reference augmented: foreground resize and position, flip,
   colour jitter, random erasing - ``bootpig_data.augment_reference``), one timestep ``t`` per row, shared by the
   target and its reference (paper Alg. 1);
2. the reference UNet reads ``r0`` noised to ``t`` with the caption's first clause as its prompt (official
   ``gen_dataset.py``); a collector records the normed tokens entering every ``attn1`` (the reference UNet's own
   output is discarded);
3. the base UNet denoises ``x0`` noised to ``t`` with the caption (dropped to "" with p 0.15), every ``attn1`` being
   Reference Self-Attention over its own tokens and the reference's, keys of the reference tokens scaled by
   ``ref_scale`` (1.1) - the very RSA patch sampling uses (``nodes/reference_attention.py``), in bank mode;
4. the loss is the plain diffusion loss over the whole latent on the model's own target (eps or v, from
   ``model_sampling``: ``nodes/forward_process.py``); not masked (paper Eq. 1).

With p 0.15 the references are dropped for the whole (global) batch: the step is then the base UNet's plain loss
(RSA reverts to self-attention), which keeps the base model's text-to-image ability.

The optimizer, schedule (constant after a linear warm-up, as the official config), clipping, accumulation, mixed
precision, torchrun DDP, checkpoints / exact resume, progress and cancel are the engine's
(``nodes/training_engine.py``). Output: the pack's BootPIG weights file (``nodes/bootpig_weights.py``), loaded by
the BootPIG Loader.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import introspect
from .forward_process import sample_timesteps
from .errors import InputError, require

LOG = logging.getLogger("personalize.bootpig")
TECHNIQUE = "bootpig"


@dataclass
class BootPIGConfig:
    """The paper's recipe as defaults (§4.1, App. B; official configs): lr 5e-6 reference UNet, 1e-6 RSA layers,
    AdamW (0.9, 0.999), weight decay 1e-2, clipping 1.0, 200 warm-up steps then constant, reference and caption
    dropout 0.15, ref_scale 1.1."""

    steps: int = 1000
    batch_size: int = 4                   # per process and micro-batch; global = batch x processes x accumulation
    grad_accumulation: int = 1
    reference_unet_lr: float = 5e-6
    rsa_lr: float = 1e-6
    train_reference_unet: bool = True     # ablations (paper Table 2): False = "RSA only"
    train_rsa: bool = True                #                             False = "reference UNet only"
    ref_scale: float = 1.1
    reference_dropout: float = 0.15
    caption_dropout: float = 0.15
    augment: bool = True                  # the reference augmentations (paper App. E; without them "corrupted")
    warmup_steps: int = 200
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    resolution: int = 0                   # 0: the dataset's own size
    seed: int = 0
    training_dtype: str = "auto"
    checkpoint_every: int = 100
    save_dtype: str = "fp16"              # the weights file (fp16 halves it; training keeps fp32 masters)


@dataclass
class TrainResult:
    path: str
    reference_unet: dict
    base_attn1: dict
    metadata: dict
    losses: list = field(default_factory=list)      # [(step, loss)]
    resumed_from: int = 0
    items: int = 0


def validate_config(cfg: BootPIGConfig) -> None:
    from .training_engine import TRAINING_DTYPES

    require(isinstance(cfg.steps, int) and cfg.steps >= 1, "steps", "at least 1", cfg.steps)
    require(isinstance(cfg.batch_size, int) and cfg.batch_size >= 1, "batch_size", "at least 1", cfg.batch_size)
    require(cfg.grad_accumulation >= 1, "grad_accumulation", "at least 1", cfg.grad_accumulation)
    require(cfg.train_reference_unet or cfg.train_rsa, "train_reference_unet",
            "the reference UNet, the RSA layers or both to train", "neither")
    for name in ("reference_unet_lr", "rsa_lr", "ref_scale", "weight_decay", "max_grad_norm"):
        v = getattr(cfg, name)
        require(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, name, "a finite number >= 0", v)
    for name in ("reference_dropout", "caption_dropout"):
        v = getattr(cfg, name)
        require(isinstance(v, (int, float)) and 0.0 <= v < 1.0, name, "a probability from 0 to below 1", v)
    require(cfg.resolution == 0 or (cfg.resolution >= 64 and cfg.resolution % 8 == 0), "resolution",
            "0 (the dataset's size) or a multiple of 8 from 64", cfg.resolution)
    from .bootpig_weights import SAVE_DTYPES

    require(cfg.save_dtype in SAVE_DTYPES, "save_dtype", f"one of {sorted(SAVE_DTYPES)}", cfg.save_dtype)
    require(cfg.training_dtype in TRAINING_DTYPES, "training_dtype", f"one of {TRAINING_DTYPES}", cfg.training_dtype)


def is_attn1(name: str) -> bool:
    """A base-UNet parameter that BootPIG trains: the self-attention projections of a transformer block."""
    return ".attn1." in name


def _mix(*xs) -> int:
    h = hashlib.blake2b(repr(xs).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


# ------------------------------------------------------------------------------------------------------ the step
class BootPIGStep(torch.nn.Module):
    """The engine's module: the trainable reference UNet and base UNet (frozen_copy's of the model's UNet), both
    called through ComfyUI's own model path (``training_engine.UNetCall``). ``predict`` is the BootPIG forward
    (also used by the tests against the Loader + RSA Patch route); ``forward(batch)`` its loss."""

    def __init__(self, base_model, reference_unet, base_unet, ref_scale: float, family: str, resolution: int):
        super().__init__()
        from .reference_attention import RSAPatch, RSASettings
        from .training_engine import UNetCall

        self.reference_unet = reference_unet
        self.base_unet = base_unet
        self._calls = [UNetCall(base_model, reference_unet), UNetCall(base_model, base_unet)]  # not submodules
        self.model_sampling = base_model.model_sampling
        self.rsa = RSAPatch(None, RSASettings(ref_scale=float(ref_scale), batched=False))
        self.blocks = introspect.transformer_blocks(base_model)
        self.family = family
        self.resolution = resolution

    def conds(self, contexts: torch.Tensor, pooled: torch.Tensor | None, device):
        """One conditioning entry per row: (context [1, T, D], extras) - SDXL's size conditioning at the training
        resolution."""
        out = []
        for i in range(contexts.shape[0]):
            extras = {"pooled_output": None if pooled is None else pooled[i:i + 1].to(device)}
            if self.family == "sdxl":
                r = self.resolution
                extras.update(width=r, height=r, crop_w=0, crop_h=0, target_width=r, target_height=r)
            out.append((contexts[i:i + 1].to(device), extras))
        return out

    def reference_features(self, r_noisy, sigma, ref_conds) -> dict:
        """{BlockKey: normed attn1 input [B, T, C]} of the reference UNet for the noisy references."""
        from .attention import with_attn1_collector

        to, bank = with_attn1_collector({}, self.rsa.bank_key)
        self._calls[0](r_noisy, sigma, ref_conds, [1] * len(ref_conds), transformer_options=to)
        return dict(bank)

    def base_options(self, bank: dict | None, rows: int, device) -> dict:
        """transformer_options running every attn1 of the base UNet as RSA over ``bank`` (row r reads reference r),
        or plain self-attention (``bank`` None)."""
        from .reference_attention import CallState

        if bank is None:
            return {}
        state = CallState(self.rsa.settings, 1, (torch.arange(rows, device=device) + rows).unsqueeze(1),
                          torch.ones(rows, dtype=torch.bool, device=device), all_ref=True, none_ref=False, bank=bank)
        replace = {tuple(k): self.rsa.replace for k in self.blocks}
        return {"patches": {"attn1_patch": [self.rsa]}, "patches_replace": {"attn1": replace},
                self.rsa.state_key: state}

    def predict(self, x_noisy, r_noisy, sigma, conds, ref_conds):
        """The base UNet's output (eps / v) for ``x_noisy`` with RSA onto ``r_noisy`` (None: no reference)."""
        bank = None if r_noisy is None else self.reference_features(r_noisy, sigma, ref_conds)
        to = self.base_options(bank, x_noisy.shape[0], x_noisy.device)
        return self._calls[1](x_noisy, sigma, conds, [1] * len(conds), transformer_options=to)

    def forward(self, batch: dict) -> dict:
        from . import forward_process as fp
        from .training_engine import to_device

        dev = next(p for p in self.parameters() if p.requires_grad).device
        x0, noise = to_device(batch["x0"], dev).float(), to_device(batch["noise"], dev).float()
        sigma = to_device(batch["sigma"], dev).float()
        ms = self.model_sampling
        conds = self.conds(batch["context"], batch.get("pooled"), dev)
        r_noisy, ref_conds = None, None
        if not batch["drop_reference"]:
            r0, rnoise = to_device(batch["r0"], dev).float(), to_device(batch["ref_noise"], dev).float()
            r_noisy = fp.noisy(ms, sigma, r0, rnoise)
            ref_conds = self.conds(batch["ref_context"], batch.get("ref_pooled"), dev)
        pred = self.predict(fp.noisy(ms, sigma, x0, noise), r_noisy, sigma, conds, ref_conds).float()
        loss = torch.nn.functional.mse_loss(pred, fp.target(ms, sigma, x0, noise))
        return {"loss": loss}


# ------------------------------------------------------------------------------------------------------ the data
class Prepared:
    """The dataset ready for batches: target latents (encoded once), reference images (augmented and encoded per
    step: the augmentation is drawn anew each time), the text encodings of every caption, its first clause and the
    empty caption (the text encoder is frozen: encoded once)."""

    def __init__(self, items, model, clip, vae, resolution: int):
        from .bootpig_data import first_clause
        from .images import prepare_pixels

        bm = introspect.base_model(model)
        self.bm, self.vae, self.resolution = bm, vae, resolution
        self.names = [it.name for it in items]
        self.targets = bm.process_latent_in(vae.encode(prepare_pixels([it.target for it in items], resolution))
                                            .float().cpu()).float().clone()
        self.references = [it.reference.float().clone() for it in items]
        texts = sorted({it.caption for it in items} | {first_clause(it.caption) for it in items} | {""})
        self.text = {}
        for t in texts:
            cond, pooled = clip.encode_from_tokens(clip.tokenize(t), return_pooled=True)
            self.text[t] = (cond.float().cpu().clone(), None if pooled is None else pooled.float().cpu().clone())
        self.captions = [it.caption for it in items]
        self.ref_captions = [first_clause(it.caption) for it in items]
        lengths = {v[0].shape[1] for v in self.text.values()}
        self.tokens = max(lengths)

    def __len__(self):
        return len(self.names)

    def context(self, text: str):
        cond, pooled = self.text[text]
        if cond.shape[1] != self.tokens:   # long captions: ComfyUI repeats contexts to a common length
            cond = cond.repeat(1, math.ceil(self.tokens / cond.shape[1]), 1)[:, :self.tokens]
        return cond, pooled

    def encode_references(self, images: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            px = torch.stack(images)
            return self.bm.process_latent_in(self.vae.encode(px).float().cpu()).float()

    def fingerprint(self) -> str:
        from .training_engine import fingerprint

        return fingerprint(self.targets, self.captions, [r.shape for r in self.references],
                           fingerprint(*self.references))


def step_batch(step: int, cfg: BootPIGConfig, data: Prepared, sigmas: torch.Tensor, parts: int, part: int) -> dict:
    """Part ``part`` of ``parts`` of the global batch of ``step``: a pure function of (seed, step). The reference
    dropout is one draw for the whole global batch (official code)."""
    from .bootpig_data import augment_reference
    from .images import subject_on_white

    b = cfg.batch_size
    B = b * parts
    g = torch.Generator().manual_seed(_mix(cfg.seed, 1, step))
    n = len(data)
    epoch_perm = {}
    idx = []
    for i in range(step * B, (step + 1) * B):
        e = i // n
        if e not in epoch_perm:
            epoch_perm[e] = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(cfg.seed, 2, e)))
        idx.append(int(epoch_perm[e][i % n]))
    drop_ref = bool(torch.rand((), generator=g) < cfg.reference_dropout)
    drop_cap = (torch.rand(B, generator=g) < cfg.caption_dropout).tolist()
    t = sample_timesteps(sigmas, B, g)
    shape = tuple(data.targets.shape[1:])
    noise = torch.randn((B,) + shape, generator=g)
    ref_noise = torch.randn((B,) + shape, generator=g)
    aug_seeds = torch.randint(0, 2 ** 62, (B,), generator=g).tolist()
    lo, hi = part * b, (part + 1) * b
    rows = list(range(lo, hi))
    ctx = [data.context("" if drop_cap[r] else data.captions[idx[r]]) for r in rows]
    out = {"x0": data.targets[[idx[r] for r in rows]], "noise": noise[lo:hi], "sigma": sigmas[t[lo:hi]],
           "t": t[lo:hi], "context": torch.cat([c for c, _ in ctx]),
           "pooled": None if ctx[0][1] is None else torch.cat([p for _, p in ctx]), "drop_reference": drop_ref,
           "index": [idx[r] for r in rows]}
    if not drop_ref:
        res = data.resolution
        imgs = []
        for r in rows:
            ref = data.references[idx[r]]
            if cfg.augment:
                imgs.append(augment_reference(ref, torch.Generator().manual_seed(int(aug_seeds[r])), res))
            else:
                imgs.append(subject_on_white(ref, None, res))
        rc = [data.context(data.ref_captions[idx[r]]) for r in rows]
        out.update(r0=data.encode_references(imgs), ref_noise=ref_noise[lo:hi], ref_context=torch.cat([c for c, _ in rc]),
                   ref_pooled=None if rc[0][1] is None else torch.cat([p for _, p in rc]))
    return out


class BootPIGTrainer:
    """What the engine runs: the step module, the two parameter groups, the batch stream."""

    find_unused_parameters = True   # the reference UNet's layers after its last attn1 never reach the loss; a
    #                                 dropped-reference step leaves the whole reference UNet out of the graph

    def __init__(self, module: BootPIGStep, ref_params: list, rsa_params: list, cfg: BootPIGConfig, data: Prepared,
                 sigmas: torch.Tensor):
        from .training_engine import ParamGroup

        self.module, self.cfg, self.data, self.sigmas = module, cfg, data, sigmas
        self.groups = []
        if ref_params:
            self.groups.append(ParamGroup("reference_unet", ref_params, cfg.reference_unet_lr))
        if rsa_params:
            self.groups.append(ParamGroup("rsa", rsa_params, cfg.rsa_lr))

    def param_groups(self):
        return self.groups

    def batch(self, step: int, part: int, parts: int) -> dict:
        return step_batch(step, self.cfg, self.data, self.sigmas, parts, part)


def engine_config(cfg: BootPIGConfig):
    from .training_engine import EngineConfig

    return EngineConfig(steps=cfg.steps, warmup_steps=min(cfg.warmup_steps, max(0, cfg.steps - 1)),
                        schedule="constant", weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8,
                        max_grad_norm=cfg.max_grad_norm, grad_accumulation=cfg.grad_accumulation,
                        training_dtype=cfg.training_dtype, checkpoint_every=cfg.checkpoint_every, log_every=10)


def build_step(model, cfg: BootPIGConfig, resolution: int, autocast_dtype=None):
    """(BootPIGStep, reference-UNet trainables, base attn1 trainables). Both UNets are frozen_copy's of the model's
    UNet: new module objects over its storage, the trained parameters cloned as fp32 masters; ``model`` is not
    modified. The model is loaded first: ComfyUI installs a clone's object patches and weight patches in the UNet
    they share when it loads that clone (and keeps them until another loads), so the UNet read here is ``model``'s
    own, not the last sampled clone's (a Subject-Diffusion 5-channel conv_in, a LoRA)."""
    import comfy.model_management as mm

    from .frozen_weights import frozen_copy

    mm.load_models_gpu([model], force_full_load=True)

    bm = introspect.base_model(model)
    fam = introspect.family(model, "model")
    weight_dtype = torch.float32 if autocast_dtype is None else None
    with torch.inference_mode(False):
        ref_unet, ref_params = frozen_copy(bm.diffusion_model, (lambda n: True) if cfg.train_reference_unet else (),
                                           frozen_dtype=weight_dtype)
        base_unet, rsa_params = frozen_copy(bm.diffusion_model, is_attn1 if cfg.train_rsa else (),
                                            frozen_dtype=weight_dtype)
        step = BootPIGStep(bm, ref_unet, base_unet, cfg.ref_scale, fam, resolution)
    return step, list(ref_params.values()), list(rsa_params.values())


def trained_weights(step: BootPIGStep) -> tuple[dict, dict]:
    """(reference UNet state dict, base attn1 state dict) as the pack's BootPIG file stores them (model keys)."""
    ref = {k: v.detach().float().cpu().clone() for k, v in step.reference_unet.state_dict().items()}
    attn1 = {k: v.detach().float().cpu().clone() for k, v in step.base_unet.state_dict().items() if is_attn1(k)}
    return ref, attn1


def _signature(cfg: BootPIGConfig, family: str, world: int, data_fp: str) -> dict:
    sig = dataclasses.asdict(cfg)
    for k in ("steps", "checkpoint_every", "save_dtype"):
        sig.pop(k)
    sig.update(family=family, global_batch=cfg.batch_size * world * cfg.grad_accumulation, data=data_fp)
    return sig


def metadata(cfg: BootPIGConfig, family: str, world: int, items: int, resumed_from: int, dataset: str) -> dict:
    from .training_engine import optimizer_description

    return {"personalize.technique": TECHNIQUE, "personalize.config": json.dumps(dataclasses.asdict(cfg),
                                                                                 sort_keys=True),
            "personalize.optimizer": optimizer_description(engine_config(cfg)),
            "personalize.global_batch": str(cfg.batch_size * world * cfg.grad_accumulation),
            "personalize.dataset": os.path.basename(os.path.normpath(dataset)), "personalize.dataset_items": str(items),
            "personalize.resumed_from_step": str(resumed_from)}


def train(model, clip, vae, dataset: str, cfg: BootPIGConfig, save_path: str, *, overwrite: bool = False,
          resume: bool = True, on_step: Callable[[int, int, float], None] | None = None,
          check_interrupt: Callable[[], None] | None = None, progress: bool = True) -> TrainResult:
    """Train BootPIG on a bootstrap dataset folder and write the pack's BootPIG weights to ``save_path``. Every input
    is validated before the heavy work. Under torch.distributed each rank calls this with the same arguments; rank 0
    writes the files."""
    import comfy.model_management as mm

    from . import bootpig_weights, training_engine as engine
    from .bootpig_data import load_items
    from .forward_process import training_sigmas

    rank, world = engine.dist_info()
    validate_config(cfg)
    fam = introspect.family(model, "model")
    require(clip is not None, "clip", "the checkpoint's text encoder (CLIP)", None)
    require(vae is not None, "vae", "the checkpoint's VAE", None)
    require(save_path.endswith(".safetensors"), "save_name", "a .safetensors path", save_path)
    if os.path.exists(save_path) and not overwrite:
        raise InputError("save_name", "a name that does not exist yet", save_path,
                         hint="choose another save_name or set overwrite to true")
    items = load_items(dataset, "dataset")
    res = cfg.resolution or int(items[0].target.shape[0])
    require(res % 8 == 0 and res >= 64, "resolution", "a multiple of 8 from 64 (the dataset's size is used when "
            "resolution is 0)", res)
    rpath = engine.checkpoint_path(save_path)
    if resume:
        engine.check_resume_family(rpath, fam)

    with torch.inference_mode(False), torch.no_grad():
        mm.load_models_gpu([model], force_full_load=True)
        data = Prepared(items, model, clip, vae, res)
        data_fp = data.fingerprint()

    with torch.inference_mode(False), torch.enable_grad():
        device = model.load_device
        step_mod, ref_params, rsa_params = build_step(model, cfg, res, engine.autocast_dtype(cfg.training_dtype,
                                                                                            device))
        trainer = BootPIGTrainer(step_mod, ref_params, rsa_params, cfg, data,
                                 training_sigmas(model.get_model_object("model_sampling")))

        def on_log(step, total, d):
            if on_step is not None:
                on_step(step, total, d["loss"])

        result = engine.run(trainer, engine_config(cfg), device, checkpoint=rpath,
                            signature=_signature(cfg, fam, world, data_fp), family=fam, technique=TECHNIQUE,
                            resume=resume, on_log=on_log, check_interrupt=check_interrupt, progress=progress)
        ref_sd, attn1_sd = trained_weights(step_mod)
        meta = metadata(cfg, fam, world, len(data), result.resumed_from, dataset)
        if rank == 0:
            bootpig_weights.save(save_path, ref_sd, attn1_sd, fam, meta, cfg.save_dtype)
        engine.remove_checkpoint(rpath)
        engine.barrier()
        del trainer, step_mod
        mm.soft_empty_cache()
    return TrainResult(save_path, ref_sd, attn1_sd, meta, [(s, d["loss"]) for s, d in result.losses],
                       result.resumed_from, len(data))
