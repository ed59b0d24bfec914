"""The pack's one training engine: every trainer (DreamBooth LoRA, Subject-Diffusion, BootPIG next) runs on it.

A trainer declares three things (:class:`Trainer`):

- ``module``: an ``nn.Module`` whose ``forward(batch)`` returns ``{"loss": scalar, <other logged scalars>}``. It holds
  the trainables and the frozen parts (aliased, never copied: ``nodes/frozen_weights.py``); DDP wraps it;
- ``param_groups()``: the trainable parameters in named groups with their learning rates;
- ``batch(step, part, parts)``: part ``part`` of ``parts`` of the *global* batch of optimizer step ``step``, a pure
  function of (seed, step): a resumed run replays the exact stream, and N processes x accumulation A see the same
  examples as one process with the whole batch.

The engine owns everything else, once: AdamW (fused on CUDA), warm-up and schedule (``torch.optim.lr_scheduler``),
gradient clipping, gradient accumulation, mixed precision (CUDA: bf16, or fp16 with a GradScaler; CPU: fp32),
``torchrun`` DDP (gloo / NCCL; one process is the same code path with world size 1), ComfyUI's ProgressBar and
interrupt, the loss log (device tensors flushed to the host every ``log_every`` steps: no host sync per step), NaN
detection at those flushes, atomic checkpoints every ``checkpoint_every`` steps and on interrupt (never one with a
non-finite value; after a NaN loss the last good checkpoint stays), exact resume, and the loss-curve image.

Trainables are declared with ``frozen_weights.frozen_copy(module, train=...)``: new module objects over the model's
own storage, the named parameters cloned (fp32 masters) and trainable, the rest aliased. The same call covers adapters
(DreamBooth: ``train=()`` and LoRA wrappers injected into the copy), existing weights trained in place
(Subject-Diffusion: ``train=[... attn2.to_k/to_v ...]``) and whole modules (BootPIG, next: the reference UNet with
``train=lambda name: True`` plus the base UNet with ``train=lambda name: ".attn1." in name``), each group in a
``ParamGroup`` with its own learning rate.

The forward process (noise, sigma, timestep, target, conditioning incl. SDXL's ``y``) comes from ComfyUI's own
``model_sampling`` / ``apply_model`` / ``extra_conds``: ``nodes/forward_process.py`` and :class:`UNetCall` here.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from .errors import InputError, require

LOG = logging.getLogger("personalize.training")
TRAINING_DTYPES = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("constant", "linear", "cosine")
CHECKPOINT_SUFFIX = ".resume"


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a NaN loss). The message says where it stopped and what was kept."""


@dataclass
class EngineConfig:
    steps: int
    warmup_steps: int = 0               # linear warm-up from lr/warmup to lr
    schedule: str = "constant"          # after warm-up: constant, linear (to 0) or cosine (to 0)
    weight_decay: float = 1e-2
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0          # 0 = no clipping
    grad_accumulation: int = 1          # micro-batches per optimizer step (per process)
    training_dtype: str = "auto"        # auto: fp32 on CPU, bf16 (or fp16 + scaler) autocast on CUDA
    checkpoint_every: int = 0           # 0 = only on interrupt
    log_every: int = 10                 # steps between host syncs of the loss log (CPU: every step, syncs are free)


@dataclass
class ParamGroup:
    name: str
    params: list
    lr: float
    weight_decay: float | None = None


class Trainer:
    """What a trainer declares (duck-typed; subclassing is optional)."""

    module: torch.nn.Module
    find_unused_parameters: bool = False   # True when a step may leave some trainables out of the graph (DDP)

    def param_groups(self) -> list[ParamGroup]:
        raise NotImplementedError

    def batch(self, step: int, part: int, parts: int):
        raise NotImplementedError


@dataclass
class RunResult:
    losses: list = field(default_factory=list)     # [(step, {name: float})], steps 1..N (resumed ones included)
    resumed_from: int = 0
    checkpoint: str | None = None


def validate(cfg: EngineConfig) -> None:
    require(isinstance(cfg.steps, int) and cfg.steps >= 1, "steps", "at least 1", cfg.steps)
    require(cfg.warmup_steps >= 0, "warmup_steps", "0 or more", cfg.warmup_steps)
    require(cfg.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}", cfg.schedule)
    require(cfg.grad_accumulation >= 1, "grad_accumulation", "at least 1", cfg.grad_accumulation)
    require(cfg.training_dtype in TRAINING_DTYPES, "training_dtype", f"one of {TRAINING_DTYPES}", cfg.training_dtype)
    require(cfg.checkpoint_every >= 0, "checkpoint_every", "0 (only on interrupt) or a number of steps",
            cfg.checkpoint_every)
    for name in ("weight_decay", "max_grad_norm", "eps"):
        v = getattr(cfg, name)
        require(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, name, "a finite number >= 0", v)


# ---------------------------------------------------------------------------------------------------- devices
def autocast_dtype(name: str, device) -> torch.dtype | None:
    dev = torch.device(device).type
    if name == "fp32" or (name == "auto" and dev == "cpu"):
        return None
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        return torch.float16
    return torch.bfloat16 if (dev == "cuda" and torch.cuda.is_bf16_supported()) else torch.float16


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """Host -> GPU without a stream sync (a copy from pageable memory would wait for the queue to drain)."""
    if torch.device(device).type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def lr_factor(cfg: EngineConfig) -> Callable[[int], float]:
    """LR multiplier of optimizer step k (0-based): warm-up (k+1)/W for k < W, then the schedule."""
    w, n = int(cfg.warmup_steps), int(cfg.steps)

    def f(k: int) -> float:
        if w and k < w:
            return (k + 1) / w
        if cfg.schedule == "constant" or n <= w:
            return 1.0
        p = min(1.0, (k - w) / max(1, n - w))
        return 1.0 - p if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))

    return f


# ---------------------------------------------------------------------------------------------------- the UNet call
class UNetCall:
    """ComfyUI's own model call path for a trainable UNet: ``BaseModel.apply_model`` (model_sampling's
    ``calculate_input`` / ``timestep`` / ``calculate_denoised``, dtype handling, ``c_concat``) of a shallow shell of the
    model's BaseModel whose ``diffusion_model`` is the trainable copy, with conditioning built by the model's own
    ``extra_conds`` (SDXL's ``y`` from ``encode_adm``; ``noise_concat`` -> ``c_concat``) and batched by ComfyUI's
    own ``COND*.concat`` (token counts brought to a common multiple, as the sampler does).

    ``conds``: one ComfyUI conditioning entry ``(cond [1, T, C], extras dict)`` per group of rows, ``counts`` rows
    each. Returns the network's output (eps, v, ... whatever the model predicts), read back from the denoised value
    through ``forward_process.output_from_denoised``."""

    def __init__(self, base_model, unet: torch.nn.Module):
        shell = copy.copy(base_model)
        shell.__dict__["_modules"] = dict(base_model._modules)
        shell._modules["diffusion_model"] = unet
        self.shell = shell
        self.base = base_model
        self.model_sampling = base_model.model_sampling

    def conditioning(self, conds: Sequence, counts: Sequence[int]) -> dict:
        per = []
        for (cond, extras), n in zip(conds, counts):
            kw = dict(extras or {})
            kw.pop("cross_attn", None)
            made = self.base.extra_conds(cross_attn=cond, **kw)
            per.append({k: c.process_cond(batch_size=n, area=None) for k, c in made.items()})
        res = {}
        for k, c in per[0].items():
            others = [p[k] for p in per[1:]]
            res[k] = c.concat(others) if others else c.cond
        return res

    def __call__(self, x_noisy: torch.Tensor, sigma: torch.Tensor, conds: Sequence, counts: Sequence[int],
                 transformer_options: dict | None = None) -> torch.Tensor:
        from .forward_process import output_from_denoised

        kw = self.conditioning(conds, counts)
        kw = {k: v.to(x_noisy.device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        den = self.shell.apply_model(x_noisy, sigma, transformer_options=dict(transformer_options or {}), **kw)
        return output_from_denoised(self.model_sampling, sigma, den, x_noisy)


# ---------------------------------------------------------------------------------------------------- files
def checkpoint_path(save_path: str) -> str:
    base = save_path[: -len(".safetensors")] if save_path.endswith(".safetensors") else save_path
    return base + CHECKPOINT_SUFFIX


def check_finite(tensors: dict, what: str) -> None:
    bad = [k for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise TrainingError(f"Personalize: refusing to write {what}: non-finite values in {bad[:3]}"
                            + (f" and {len(bad) - 3} more" if len(bad) > 3 else ""))


def save_file(tensors: dict, path: str, metadata: dict | None = None, what: str = "weights") -> str:
    """The one save path of every trainer: refuse non-finite tensors, then write atomically (temporary name, rename)."""
    from .weights_io import save_atomic

    check_finite(tensors, f"{what} {os.path.basename(path)}")
    return save_atomic(tensors, path, metadata)


def read_checkpoint_meta(path: str, input_name: str = "save_name") -> dict | None:
    if not os.path.isfile(path):
        return None
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001
        raise InputError(input_name, "a readable resume checkpoint", f"{path}: {e}",
                         hint="delete the .resume file or set resume to false") from e


def check_resume_family(path: str, family: str, input_name: str = "save_name") -> dict | None:
    """Metadata of a resume checkpoint, or None; InputError if it was trained on another model family."""
    from .introspect import FAMILY_NAMES

    meta = read_checkpoint_meta(path, input_name)
    if meta is None:
        return None
    theirs = meta.get("personalize.family")
    if theirs != family:
        raise InputError("model", f"an {FAMILY_NAMES.get(theirs, theirs)} model (the family the resume "
                         f"checkpoint {os.path.basename(path)} was trained on)", f"an {FAMILY_NAMES[family]} model",
                         hint=f"use another {input_name}, delete the .resume file or set resume to false")
    return meta


def check_signature(meta: dict, signature: dict, path: str, input_name: str = "save_name") -> None:
    old = json.loads(meta.get("personalize.signature", "{}"))
    diff = sorted(k for k in set(old) | set(signature) if old.get(k) != signature.get(k))
    if diff:
        raise InputError(input_name, f"settings matching the resume checkpoint {os.path.basename(path)}",
                         "different " + ", ".join(diff),
                         hint=f"use another {input_name}, delete the .resume file or set resume to false")


_BAD_CHARS = re.compile(r'[\x00-\x1f<>:"|?*\\]')


def sanitize_save_name(name: str, input_name: str = "save_name") -> str:
    """A relative name under a model folder (subfolders allowed), without extension; no traversal, no absolute
    path."""
    require(isinstance(name, str) and name.strip() != "", input_name, "a non-empty file name", repr(name))
    n = name.strip()
    if n.lower().endswith(".safetensors"):
        n = n[: -len(".safetensors")]
    parts = n.split("/")
    if (n.startswith(("/", "~")) or os.path.isabs(n) or _BAD_CHARS.search(n)
            or any(p in ("", ".", "..") for p in parts) or any(p.startswith(".") for p in parts)):
        raise InputError(input_name, "a plain file name under the model folder (letters, digits, _ - space, "
                         "optional sub/folder), without '..', a leading '/', '\\' or any of <>:\"|?*", repr(name))
    return n


def save_path_for(directory: str, name: str, overwrite: bool, input_name: str = "save_name") -> str:
    name = sanitize_save_name(name, input_name)
    root = os.path.realpath(directory)
    path = os.path.realpath(os.path.join(root, name + ".safetensors"))
    require(os.path.commonpath([root, path]) == root, input_name, f"a name inside {root}", repr(name))
    from .weights_io import check_file_name

    # the final name, its checkpoint and the temporary names must fit the file system: checked before training
    check_file_name(path, input_name, also=[checkpoint_path(path)])
    if os.path.exists(path) and not overwrite:
        raise InputError(input_name, "a name that does not exist yet", f"{name}.safetensors (already in {root})",
                         hint="choose another save_name or set overwrite to true")
    return path



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


# ---------------------------------------------------------------------------------------------------- progress
def comfy_progress(total: int, label: str) -> Callable[[int, dict | None], None]:
    """ComfyUI's ProgressBar (every step: host-side only) plus the latest losses as text under the node."""
    import comfy.utils

    pbar = comfy.utils.ProgressBar(total)
    node_id = server = None
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer

        ctx = get_executing_context()
        node_id = ctx.node_id if ctx is not None else None
        server = getattr(PromptServer, "instance", None)
    except Exception:  # noqa: BLE001  (headless use: no server module state)
        pass

    def update(step: int, values: dict | None) -> None:
        pbar.update_absolute(step, total)
        if values and server is not None and node_id is not None and hasattr(server, "send_progress_text"):
            text = f"{label} step {step}/{total}  " + "  ".join(f"{k} {v:.4f}" for k, v in values.items())
            try:
                server.send_progress_text(text, node_id)
            except Exception:  # noqa: BLE001
                pass

    return update


# ---------------------------------------------------------------------------------------------------- the loop
def _param_list(groups: list[ParamGroup]) -> list:
    return [p for g in groups for p in g.params]


def optimizer_description(cfg: EngineConfig) -> str:
    """What ``_make_optimizer`` builds, in the form kohya's ``ss_optimizer`` metadata writes it."""
    return f"torch.optim.AdamW(weight_decay={cfg.weight_decay},betas={tuple(cfg.betas)},eps={cfg.eps:.0e})"


def _make_optimizer(groups: list[ParamGroup], cfg: EngineConfig, device):
    pg = [{"params": list(g.params), "lr": float(g.lr),
           "weight_decay": cfg.weight_decay if g.weight_decay is None else float(g.weight_decay)} for g in groups]
    kw = dict(betas=tuple(cfg.betas), eps=cfg.eps)
    if torch.device(device).type == "cuda":
        try:
            return torch.optim.AdamW(pg, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):  # e.g. a parameter dtype the fused kernel lacks
            pass
    return torch.optim.AdamW(pg, foreach=True, **kw)


def _checkpoint_tensors(groups, opt, scaler) -> dict:
    out = {}
    state = opt.state_dict()["state"]
    for i, p in enumerate(_param_list(groups)):
        out[f"param.{i}"] = p.detach()
        for k, v in state.get(i, {}).items():
            out[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().reshape(-1) if k == "step" else v.detach()
    if scaler is not None:
        for k, v in scaler.state_dict().items():
            if isinstance(v, (int, float)):
                out[f"scaler.{k}"] = torch.tensor([float(v)], dtype=torch.float64)
    return out


def _load_checkpoint(tensors: dict, groups, opt, scaler, path: str) -> None:
    params = _param_list(groups)
    n = sum(1 for k in tensors if k.startswith("param."))
    if n != len(params):
        raise InputError("save_name", f"a resume checkpoint with {len(params)} trainable tensors",
                         f"{n} in {os.path.basename(path)}", hint="delete the .resume file or set resume to false")
    sd = opt.state_dict()
    with torch.no_grad():
        for i, p in enumerate(params):
            src = tensors[f"param.{i}"]
            require(tuple(src.shape) == tuple(p.shape), "save_name", f"a resume checkpoint for this model (tensor {i}"
                    f" of shape {tuple(p.shape)})", tuple(src.shape))
            p.copy_(src.to(p.device, p.dtype))
            st = {}
            for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
                if f"opt.{i}.{k}" in tensors:
                    v = tensors[f"opt.{i}.{k}"]
                    st[k] = v.reshape(()).clone() if k == "step" else v.to(p.device, p.dtype).clone()
            if st:
                sd["state"][i] = st
    opt.load_state_dict(sd)
    if scaler is not None:
        ss = scaler.state_dict()
        for k in list(ss):
            if f"scaler.{k}" in tensors:
                ss[k] = type(ss[k])(float(tensors[f"scaler.{k}"][0])) if isinstance(ss[k], (int, float)) else ss[k]
        scaler.load_state_dict(ss)


def run(trainer: Trainer, cfg: EngineConfig, device, *, checkpoint: str | None = None, signature: dict | None = None,
        family: str | None = None, technique: str = "training", resume: bool = True,
        on_log: Callable[[int, int, dict], None] | None = None,
        check_interrupt: Callable[[], None] | None = None, progress: bool = True) -> RunResult:
    """Train ``trainer`` for ``cfg.steps`` optimizer steps. Under ``torch.distributed`` every rank calls this with
    the same arguments; rank 0 writes the checkpoints. ``checkpoint``: the resume file (None: no checkpoints)."""
    validate(cfg)
    import comfy.model_management as mm

    rank, world = dist_info()
    sig = dict(signature or {})
    sig.update(global_batch_parts=world * cfg.grad_accumulation, family=family, engine=_engine_signature(cfg))
    groups = trainer.param_groups()
    params = _param_list(groups)
    require(len(params) > 0, "model", "something to train", "no trainable parameters")
    ac = autocast_dtype(cfg.training_dtype, device)
    dev_type = torch.device(device).type
    cuda = dev_type == "cuda"
    opt = _make_optimizer(groups, cfg, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg))
    scaler = torch.amp.GradScaler(dev_type) if ac == torch.float16 else None

    result = RunResult(checkpoint=checkpoint)
    start = 0
    if checkpoint and resume:
        meta = read_checkpoint_meta(checkpoint)
        if meta is not None:
            check_signature(meta, sig, checkpoint)
            from .weights_io import load

            tensors, _ = load(checkpoint)
            _load_checkpoint(tensors, groups, opt, scaler, checkpoint)
            start = int(meta["personalize.step"])
            require(start < cfg.steps, "steps", f"more than the {start} steps already in the resume checkpoint",
                    cfg.steps)
            result.losses = [(int(s), dict(v)) for s, v in json.loads(meta.get("personalize.losses", "[]"))]
            # the schedule continues at step ``start`` (the groups carry "initial_lr" from the first scheduler)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg), last_epoch=start - 1)
            result.resumed_from = start

    module = trainer.module
    runner = module
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_ids = {id(p) for p in params}
        frozen = [n for n, p in module.named_parameters() if id(p) not in train_ids]
        frozen += [n for n, _ in module.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(module, frozen)
        # a trainer whose steps may leave some trainables out of the graph (e.g. text dropout) says so
        runner = DDP(module, device_ids=[torch.device(device).index] if cuda else None,
                     find_unused_parameters=bool(getattr(trainer, "find_unused_parameters", False)))

    log_every = max(1, cfg.log_every) if cuda else 1   # a CPU "sync" costs nothing: report every step
    bar = comfy_progress(cfg.steps, technique) if progress else None
    pending: list = []                                   # [(step, {name: device scalar})]
    last_good = start if (checkpoint and start) else None
    parts = world * cfg.grad_accumulation
    t0 = time.time()
    done = start

    def flush(reduce: bool = True):
        """Losses to the host (one sync, one all_reduce); TrainingError on a non-finite loss."""
        nonlocal pending
        if not pending:
            return
        names = list(pending[0][1])
        x = torch.stack([torch.stack([v[k].detach().float() for k in names]) for _, v in pending])
        if world > 1 and reduce:
            import torch.distributed as dist

            dist.all_reduce(x)
            x = x / world
        vals = x.cpu().tolist()
        steps_ = [s for s, _ in pending]
        pending = []
        for s, row in zip(steps_, vals):
            d = dict(zip(names, row))
            if not all(math.isfinite(v) for v in d.values()):
                kept = (f"the last good checkpoint (step {last_good}) is kept in {checkpoint}" if last_good
                        else "no checkpoint was written")
                raise TrainingError(f"Personalize: {technique} stopped: the loss became {d.get('loss')} at step {s} "
                                    f"(non-finite); nothing non-finite was saved, {kept}. Lower the learning rate, "
                                    f"use fp32 or bf16 instead of fp16, or check the inputs for NaN.")
            result.losses.append((s, d))
            if on_log is not None:
                on_log(s, cfg.steps, d)
        if bar is not None:
            bar(steps_[-1], result.losses[-1][1] if result.losses else None)

    def save_checkpoint(step: int) -> None:
        nonlocal last_good
        if not checkpoint:
            return
        if rank == 0:
            meta = {"personalize.step": str(step), "personalize.signature": json.dumps(sig, sort_keys=True),
                    "personalize.losses": json.dumps(result.losses), "personalize.family": str(family),
                    "personalize.technique": f"{technique} resume checkpoint"}
            save_file(_checkpoint_tensors(groups, opt, scaler), checkpoint, meta, "resume checkpoint")
        last_good = step

    interrupts = (mm.InterruptProcessingException, KeyboardInterrupt)
    try:
        for step in range(start, cfg.steps):
            if check_interrupt is not None:
                check_interrupt()
            opt.zero_grad(set_to_none=True)
            logged: dict = {}
            for micro in range(cfg.grad_accumulation):
                batch = trainer.batch(step, rank * cfg.grad_accumulation + micro, parts)
                sync_ctx = runner.no_sync() if (world > 1 and micro < cfg.grad_accumulation - 1) else _null()
                with sync_ctx:
                    if ac is not None:
                        with torch.autocast(device_type=dev_type, dtype=ac):
                            out = runner(batch)
                    else:
                        out = runner(batch)
                    loss = out["loss"].float() / cfg.grad_accumulation
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                for k, v in out.items():
                    v = v.detach().float() / cfg.grad_accumulation
                    logged[k] = v if k not in logged else logged[k] + v
            if scaler is not None:
                scaler.unscale_(opt)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            done = step + 1
            pending.append((done, logged))
            ckpt = bool(cfg.checkpoint_every) and done % cfg.checkpoint_every == 0 and done < cfg.steps
            if ckpt or done == cfg.steps or len(pending) >= log_every:
                flush()
            elif bar is not None:
                bar(done, None)
            if ckpt:
                save_checkpoint(done)
    except interrupts:
        # cancelled (ComfyUI's interrupt is checked at the start of a step, so ``done`` steps are complete): keep
        # them, once their losses are known to be finite; then the interrupt goes on. No collective here: under
        # torchrun the ranks may be interrupted at different points (the log gets rank 0's own values).
        if checkpoint and done > (last_good or 0):
            try:
                flush(reduce=False)
                save_checkpoint(done)
            except TrainingError:
                pass
        raise
    LOG.info("%s: %d steps in %.1fs", technique, cfg.steps - start, time.time() - t0)
    return result


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _engine_signature(cfg: EngineConfig) -> dict:
    d = asdict(cfg)
    for k in ("steps", "checkpoint_every", "log_every"):   # may change between a run and its resume
        d.pop(k)
    d["betas"] = list(d["betas"])
    return d


def remove_checkpoint(path: str | None) -> None:
    if path and dist_info()[0] == 0 and os.path.exists(path):
        os.unlink(path)


# ---------------------------------------------------------------------------------------------------- loss curve
COLOURS = ((40, 90, 200), (230, 130, 30), (40, 160, 80), (190, 50, 50))


def loss_curve_image(losses, names: Sequence[str] | None = None, width: int = 512, height: int = 256) -> torch.Tensor:
    """IMAGE [1, H, W, 3]: each named loss per step (``losses`` = [(step, {name: value})]), raw (faint) and
    smoothed."""
    import numpy as np
    from PIL import Image, ImageDraw

    names = list(names) if names is not None else (list(losses[0][1]) if losses else [])
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    pad = 28
    d.rectangle([pad, 8, width - 8, height - pad], outline=(160, 160, 160))
    series = [([v.get(k) for _, v in losses if v.get(k) is not None], COLOURS[i % len(COLOURS)])
              for i, k in enumerate(names)]
    vals = [v for s, _ in series for v in s if math.isfinite(v)]
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
        legend = ", ".join(f"{k} ({'blue orange green red'.split()[i % 4]})" for i, k in enumerate(names))
        d.text((pad + 4, 10), f"{legend}   max {hi:.4g}", fill=(0, 0, 0))
        d.text((pad + 4, height - pad + 6), f"step 1 .. {len(losses)}   min {lo:.4g}", fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).unsqueeze(0)
