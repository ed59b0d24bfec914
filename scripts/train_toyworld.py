"""Train the toy world's model and scorers (CPU is enough; ``--device cuda`` uses a GPU).

    .venv/bin/python scripts/train_toyworld.py vae       # TAESD-architecture VAE on 128 px world-v2 renders
    .venv/bin/python scripts/train_toyworld.py unet      # the SD1.5-family UNet on VAE latents (16x16) of base renders
    .venv/bin/python scripts/train_toyworld.py scorers   # class/background classifier + instance embedder
    .venv/bin/python scripts/train_toyworld.py segmenter # the toy mask source (subject segmenter) on 128 px renders
    .venv/bin/python scripts/train_toyworld.py vae-ceiling   # measure: VAE round-trip subject fidelity (no training)
    .venv/bin/python scripts/train_toyworld.py segmenter-eval   # measure: the segmenter's IoU (no training)
    .venv/bin/python scripts/train_toyworld.py unet-check    # measure: class / background of base generations

Each stage reads its recipe from CONFIG below (override with --steps / --set key=value) and writes
<out>/<stage>.safetensors (fp16, atomically; the recipe in the file's metadata) plus a resume checkpoint
<out>/<stage>.ckpt (fp32 weights, optimizer / EMA state, step count, numpy + torch RNG states). ``--minutes M`` (or
SIGINT / SIGTERM) stops a stage at the end of its current step and saves both; ``--resume`` continues from the
checkpoint exactly where it stopped (same batches, same schedule: the learning rate depends on the step only), so an
interrupted run ends bit-identical to an uninterrupted one (tests/test_toyworld.py checks it on a tiny config).
The default output is weights/toyworld, the shipped set (world v2 since the switch of issue #12; world v1's files
are in the history, at fb72da7).
Every image is drawn procedurally from a seed (toyworld/scenes.py): nothing is downloaded.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from scripts import host  # noqa: E402

host.bootstrap()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from personalize.toyworld import model as tw_model  # noqa: E402  (the pack, through its import root)
from personalize.toyworld import scenes  # noqa: E402
from personalize.toyworld import scorers as tw_scorers  # noqa: E402  (the scorers' input size is their recipe's)
from personalize.nodes.forward_process import min_snr_weight  # noqa: E402  (the pack's one Min-SNR formula)

WEIGHTS_DIR = REPO / "weights" / "toyworld"
CONFIG = {
    # subject_weight: the loss counts pixels (latent cells for the UNet) inside the subject's mask 1 + subject_weight
    # times, so the few cells that carry the subject's shape and colour are not drowned by background texture.
    # vae: 128 px renders (16x16 latents), trained on latent-aligned 64 px crops (the VAE is convolutional; a crop
    # costs a quarter of a full image). init: a TAESD state dict to start from ("" = from scratch; "git:REV:PATH" =
    # the file as the repository held it at REV: world v1's VAE, which the v2 set replaced in weights/toyworld).
    "vae": {"steps": 360, "batch": 12, "size": 128, "crop": 64, "lr": 4e-4, "lr_end": 2e-5, "warmup": 20,
            "latent_noise": 0.1, "reg": 0.01, "subject_weight": 2.0, "calib_images": 256, "seed": 11,
            "init": "git:fb72da7:weights/toyworld/vae.safetensors", "save_every": 40},
    # unet: amp "bf16" runs the forward pass under bfloat16 autocast (fp32 weights, optimizer and loss; 2.2x faster
    # per step on a CPU with AVX512-BF16, but slower than fp32 on one without: an AVX2-only EPYC took > 6 s per step
    # against 4.8 s in fp32); "auto" (the default) = bf16 where the device computes it natively (a CUDA device that
    # supports it, a CPU with the avx512_bf16 or amx_bf16 flag), else fp32; "" = fp32. min_snr: Min-SNR-gamma loss weighting
    # (Hang et al. 2023; eps-prediction weight min(SNR, gamma) / SNR; 0 = off): the many low-noise steps, whose eps
    # targets are the hardest and least useful for shape and layout, stop dominating the gradient.
    # high_noise_cap: multiplies that weight by min(1 + sigma^2, cap) (0 = off): the v-loss / EDM weighting, truncated.
    # An eps error at sigma is a sigma-times larger error of the predicted image, and the first sampling steps
    # (sigma 14.6 -> 2) decide layout and colour from exactly those predictions; with eps loss alone those steps
    # contribute 10-20x less to the gradient than mid-noise ones (measured on the 14 129-step UNet).
    "unet": {"steps": 6000, "batch": 64, "size": 128, "lr": 1e-3, "lr_end": 5e-5, "warmup": 100, "n_images": 12000,
             "p_uncond": 0.1, "subject_weight": 3.0, "ema": 0.999, "seed": 12, "save_every": 200, "init": "",
             "amp": "auto", "min_snr": 5.0, "high_noise_cap": 0.0},
    "scorers": {"steps": 2000, "batch": 48, "size": tw_scorers.INPUT_SIZE, "lr": 6e-4, "lr_end": 3e-5, "warmup": 50,
                "temperature": 0.1, "seed": 13, "save_every": 200},
    # segmenter (the toy mask source, toyworld/segmenter.py): BCE + soft Dice on the renders' masks, 128 px.
    # vae_pool training renders are round-tripped through ``vae`` once (cached in <out>/segmenter.vaepool.ckpt) and
    # vae_per_batch of them join each batch (flipped at random); every image then gets blur / noise / colour jitter,
    # so that blurry generated images segment too. eval_refs: held-out subject renders per subject for the IoU
    # printed at the end (0: none).
    "segmenter": {"steps": 240, "batch": 16, "size": 128, "lr": 3e-3, "lr_end": 1e-4, "warmup": 10, "dice": 1.0,
                  "vae_pool": 96, "vae_per_batch": 4, "vae": "weights/toyworld/vae.safetensors",
                  "p_blur": 0.6, "noise": 0.06, "jitter": 0.15, "seed": 14, "save_every": 40, "eval_refs": 4},
}


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def lr_at(cfg, step):
    """Linear warm-up, then cosine decay to lr_end at cfg['steps']: a function of the step alone, so a resumed run
    follows the same schedule as an uninterrupted one."""
    if step < cfg.get("warmup", 0):
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    frac = min(1.0, step / max(1, cfg["steps"]))
    return cfg["lr_end"] + 0.5 * (cfg["lr"] - cfg["lr_end"]) * (1 + math.cos(math.pi * frac))


class Stop:
    """When to stop a stage early: a wall-time limit (--minutes) or SIGINT / SIGTERM; checked between steps."""

    def __init__(self, minutes, steps=None):
        self.t0, self.seconds, self.signalled = time.time(), minutes * 60, False
        self.steps, self.calls = steps, 0

    def install(self):
        def handler(signum, frame):
            log(f"signal {signum}: stopping after this step (checkpoint follows)")
            self.signalled = True

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def __call__(self):
        """True when the stage should stop before its next step."""
        self.calls += 1
        return (self.signalled or time.time() - self.t0 >= self.seconds
                or (self.steps is not None and self.calls > self.steps))


def save(tensors, path, meta):
    """fp16 safetensors through the pack's one weight writer (weights_io.save_atomic: checked for non-finite values
    after the fp16 cast, written to a temporary name and renamed)."""
    from personalize.nodes.weights_io import save_atomic

    save_atomic({k: v.detach().cpu().to(torch.float16) for k, v in tensors.items()}, str(path), meta)
    log("saved", path, f"{Path(path).stat().st_size / 1e6:.2f} MB")


def rng_state(rng, device):
    st = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(rng, st, device):
    rng.bit_generator.state = st["numpy"]
    torch.set_rng_state(st["torch"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(path, **state):
    """Everything a stage needs to continue losslessly (fp32), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.partial"
    torch.save(state, tmp)
    os.replace(tmp, path)
    log("checkpoint", path, f"step {state['step']}", f"{path.stat().st_size / 1e6:.1f} MB")


def load_checkpoint(path, cfg, reschedule=False):
    """The checkpoint at ``path``, refused when its recipe differs from ``cfg``. ``reschedule``: a different
    ``steps`` only is accepted (the schedule is a function of the step and the total, so the learning rate then
    continues on the new schedule from the step reached; the run is no longer bit-identical to an uninterrupted one,
    and the weights' metadata records where the schedule changed)."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if reschedule and ck["cfg"] != cfg and {k for k in set(ck["cfg"]) | set(cfg)
                                            if ck["cfg"].get(k) != cfg.get(k)} == {"steps"}:
        log(f"--reschedule: {ck['cfg']['steps']} -> {cfg['steps']} steps from step {ck['step']}")
        hist = list(ck.get("rescheduled", [])) + [[int(ck["step"]), int(ck["cfg"]["steps"]), int(cfg["steps"])]]
        ck["cfg"], ck["rescheduled"] = dict(cfg), hist
    if ck["cfg"] != cfg:
        changed = sorted(k for k in set(ck["cfg"]) | set(cfg) if ck["cfg"].get(k) != cfg.get(k))
        raise SystemExit(f"--resume: {path} was written with a different recipe (keys {changed}); "
                         f"pass the same --steps / --set options, or start without --resume")
    log("resuming from", path, "at step", ck["step"])
    return ck


def to_tensor(imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).float()


def render_training(rng, n, size):
    """n random training scenes (scenes.training_scenes: world v2 looks, never a held-out emblem) at ``size`` px:
    (images NCHW, subject masks N1HW)."""
    out = [scenes.render(sc, size) for sc in scenes.training_scenes(rng, n)]
    return to_tensor(np.stack([o[0] for o in out])), torch.from_numpy(np.stack([o[1] for o in out]))[:, None]


def crop(rng, c, *xs):
    """The same random latent-aligned c x c crop of every tensor (no crop when c is the image size)."""
    if c >= xs[0].shape[-1]:
        return xs
    oy, ox = (int(v) * 8 for v in rng.integers(0, (xs[0].shape[-1] - c) // 8 + 1, 2))
    return tuple(x[..., oy:oy + c, ox:ox + c] for x in xs)


def weighted_rec(y, x, m, subject_weight):
    """L1 + MSE reconstruction, pixels inside the subject mask weighted 1 + subject_weight."""
    w = 1.0 + subject_weight * m
    err = (y - x).abs() + (y - x) ** 2
    return (err * w).mean() / w.mean()


# ------------------------------------------------------------------------------------------------ VAE

def load_init(spec: str) -> dict:
    """The state dict a recipe's ``init`` names: a path (relative to the repository) or ``git:<commit>:<path>``, a
    file as the repository held it at that commit (the world-v2 VAE starts from world v1's, which the switch to v2
    replaced in weights/toyworld)."""
    import subprocess

    from safetensors.torch import load, load_file

    if spec.startswith("git:"):
        rev, path = spec[4:].split(":", 1)
        r = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], capture_output=True)
        if r.returncode:
            raise SystemExit(f"init {spec}: not in this clone's git history ({r.stderr.decode().strip()}); a shallow "
                             f"clone lacks it: fetch the history, or pass --set init=<a .safetensors path> (or "
                             f"--set init= to train from scratch)")
        return load(r.stdout)
    return load_file(str(REPO / spec))   # an absolute spec stays itself under REPO /


def _load_taesd(path):
    net = tw_model.new_taesd()
    state = load_init(str(path))
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net


def train_vae(cfg, a, stop, dev):
    out = Path(a.out)
    ckpt_path = out / "vae.ckpt"
    torch.manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])
    if cfg.get("init"):
        net = _load_taesd(cfg["init"])
        log("initialised from", cfg["init"])
    else:
        net = tw_model.new_taesd()
        from comfy.taesd.taesd import Block

        from scripts.models import init_random_

        init_random_(net.taesd_encoder, cfg["seed"])
        init_random_(net.taesd_decoder, cfg["seed"] + 1)
        with torch.no_grad():   # zero-init each residual branch's last conv: every Block starts as identity
            for mod in net.modules():
                if isinstance(mod, Block):
                    mod.conv[-1].weight.zero_()
                    mod.conv[-1].bias.zero_()
    net.to(dev)
    params = list(net.taesd_encoder.parameters()) + list(net.taesd_decoder.parameters())
    opt = torch.optim.Adam(params, lr=cfg["lr"])
    step = 0
    if a.resume:
        ck = load_checkpoint(ckpt_path, cfg, a.reschedule)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        set_rng_state(rng, ck["rng"], dev)
        step = ck["step"]
    t0 = time.time()

    def checkpoint(end=False):
        save_checkpoint(ckpt_path, model=net.state_dict(), opt=opt.state_dict(), step=step, cfg=cfg,
                        rng=rng_state(rng, dev))
        sd = dict(net.state_dict())
        if end:   # when the run ends (complete or stopped), so that the file can be used as it is
            sd.update(calibrate_vae(net, cfg, dev))
        save(sd, out / "vae.safetensors", {"stage": "vae", "config": cfg, "steps_done": step,
                                           "complete": json.dumps(step >= cfg["steps"])})

    while step < cfg["steps"] and not stop():
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        x, m = crop(rng, cfg["crop"], *render_training(rng, cfg["batch"], cfg["size"]))
        x, m = x.to(dev), m.to(dev)
        e = net.taesd_encoder(x)                                   # what the UNet sees (x0.18215 cancels vae_scale)
        z = e + cfg["latent_noise"] * torch.randn(e.shape).to(dev)
        y = net.taesd_decoder(z)
        rec = weighted_rec(y, x, m, cfg["subject_weight"])
        mu, var = e.mean(dim=(0, 2, 3)), e.var(dim=(0, 2, 3))
        reg = (mu ** 2).mean() + ((var - 1) ** 2).mean()
        loss = rec + cfg["reg"] * reg
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0:
            log(f"vae step {step} rec {rec.item():.4f} reg {reg.item():.3f} std {var.mean().sqrt().item():.2f} "
                f"lr {lr_at(cfg, step):.2e} ({time.time() - t0:.0f}s)")
        step += 1
        if step % cfg["save_every"] == 0 and step < cfg["steps"]:
            checkpoint()
    checkpoint(end=True)


@torch.no_grad()
def calibrate_vae(net, cfg, dev):
    """vae_scale / vae_shift such that SD1.5's latent format (x0.18215) hands the UNet zero-mean unit-std latents:
    ComfyUI's TAESD encode() = e / vae_scale + vae_shift, decode(x) = decoder((x - vae_shift) * vae_scale)."""
    rng = np.random.default_rng([cfg["seed"], 0xCA1])
    n = max(1, cfg["calib_images"])
    lat = torch.cat([net.taesd_encoder(render_training(rng, min(32, n - i), cfg["size"])[0].to(dev)).cpu()
                     for i in range(0, n, 32)])
    mu, sd = lat.mean().item(), lat.std().item()
    log(f"calibration on {lat.shape[0]} renders: latent mean {mu:.3f} std {sd:.3f}")
    return {"vae_scale": torch.tensor(tw_model.VAE_SCALE * sd), "vae_shift": torch.tensor(-mu / (tw_model.VAE_SCALE * sd))}


# ------------------------------------------------------------------------------------------------ UNet

def _alphas_cumprod(bm):
    sig = bm.model_sampling.sigmas.double()
    return (1.0 / (1.0 + sig ** 2)).float()


class CompactContext:
    """Exact, cheaper cross-attention for training on the bag-of-words text encoder.

    Its 77 output rows hold few distinct vectors (the caption's words, and many identical padding tokens), and
    softmax attention over m identical keys equals attention over one of them with log(m) added to its logit. So
    each caption's context is cut to its distinct rows plus a log-multiplicity bias, and every attn2 runs on that:
    the same function of the weights (``check`` compares it with the plain UNet), about 2.5x less work per step on
    CPU (the 77-token key/value projections dominate an 8x8-latent UNet)."""

    VERIFY = 32   # the first captions composed from token rows are also encoded by the CLIP and must match it

    def __init__(self, clip, unet):
        self.clip, self.cache, self.bias = clip, {}, None
        self.token_rows, self.verified = {}, 0   # token id -> its output row (the encoder is a bag of words)
        empty = self._tokenize("")
        self.words, self.start, self.end, self.pad = {}, empty[0], empty[1], empty[-1]   # word -> its token ids
        self.device = next(unet.parameters()).device
        self.modules = [m for n, m in unet.named_modules() if n.endswith("attn2")]
        self.originals = [m.forward for m in self.modules]

    def full(self, caps):
        with torch.no_grad():
            return torch.cat([self.clip.encode_from_tokens(self.clip.tokenize(c)) for c in caps]).to(self.device)

    def tokens(self, cap):
        """The caption's 77 token ids. ComfyUI's SD1 tokenizer splits the text on spaces and tokenizes each word
        alone, so a caption's ids are its words' ids (cached) between the start and end tokens, padded with the
        tokenizer's pad id (checked against the tokenizer for the first VERIFY captions)."""
        ids = [self.start]
        for w in cap.split(" "):
            if w not in self.words:
                t = self._tokenize(w)
                self.words[w] = t[1:t.index(self.end, 1)]
            ids += self.words[w]
        if len(ids) > 76:
            return self._tokenize(cap)
        return ids + [self.end] + [self.pad] * (76 - len(ids))

    def _tokenize(self, text):
        """ComfyUI's tokenizer: the 77 token ids of ``text``."""
        return [t[0] for t in self.clip.tokenize(text)["l"][0]]

    def context(self, cap):
        """The caption's 77 x 768 context, as ComfyUI's CLIP computes it. The toy encoder's output row at a position
        depends on that position's token alone (zero position embeddings and residual branches), so rows are
        composed from a per-token table filled from real encodes instead of running the CLIP (through ComfyUI's
        model management) for every new caption (1.38 -> 1.28 s per training step). The first VERIFY compositions
        are checked against the CLIP, bit for bit."""
        toks = self.tokens(cap)
        if any(t not in self.token_rows for t in toks):
            full = self.full([cap])[0]
            for p, t in enumerate(toks):
                self.token_rows.setdefault(t, full[p])
            return full, toks
        if self.verified < self.VERIFY:
            if self._tokenize(cap) != toks:
                raise AssertionError(f"word-composed tokens differ from the tokenizer's for {cap!r}")
            got, full = torch.stack([self.token_rows[t] for t in toks]), self.full([cap])[0]
            if not torch.equal(got, full):
                raise AssertionError(f"token-row context differs from the CLIP's for {cap!r}: "
                                     f"{(got - full).abs().max().item():.3g}")
            self.verified += 1
        return None, toks

    def compact(self, caps):
        rows = []
        for c in caps:
            hit = self.cache.get(c)
            if hit is None:
                full, toks = self.context(c)
                if full is None:   # distinct rows = distinct tokens; unique() sorts them as it sorts the full matrix
                    ids, n = np.unique(np.array(toks), return_counts=True)
                    u, inv = torch.unique(torch.stack([self.token_rows[int(t)] for t in ids]), dim=0,
                                          return_inverse=True)
                    counts = torch.zeros(len(u)).index_add_(0, inv.cpu(), torch.from_numpy(n).float())
                    hit = (u, counts.log())   # not kept: composing again is cheap, and a run meets ~10^5 captions
                else:
                    u, counts = torch.unique(full, dim=0, return_counts=True)
                    hit = self.cache[c] = (u, counts.float().log())
            rows.append(hit)
        n = max(r[0].shape[0] for r in rows)
        ctx = torch.zeros(len(caps), n, rows[0][0].shape[1])
        bias = torch.full((len(caps), n), float("-inf"))
        for i, (u, lb) in enumerate(rows):
            ctx[i, :len(u)], bias[i, :len(u)] = u, lb
        return ctx.to(self.device), bias.to(self.device)

    def install(self, bias):
        self.bias = bias
        for m in self.modules:
            m.forward = self._forward(m)

    def remove(self):
        for m, f in zip(self.modules, self.originals):
            m.forward = f

    def _forward(self, mod):
        def forward(x, context=None, value=None, mask=None, transformer_options={}):
            q, k, v = mod.to_q(x), mod.to_k(context), mod.to_v(context)
            b, h = q.shape[0], mod.heads
            q, k, v = (t.view(b, t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
            # written out rather than scaled_dot_product_attention(attn_mask=...): with a mask and under bf16
            # autocast its CPU backward took 0.7 s more per step; logits and softmax in fp32
            w = (q @ k.transpose(-1, -2)).float() * (q.shape[-1] ** -0.5) + self.bias[:, None, None, :]
            out = w.softmax(-1).to(v.dtype) @ v
            return mod.to_out(out.transpose(1, 2).reshape(b, x.shape[1], -1))
        return forward

    @torch.no_grad()
    def check(self, unet, caps, latent):
        with torch.random.fork_rng(devices=[]):   # leaves the training RNG where it was (exact resume)
            torch.manual_seed(0)
            self._check(unet, caps, latent)

    def _check(self, unet, caps, latent):
        p = next(unet.parameters())
        x = torch.randn(len(caps), 4, latent, latent, device=p.device)
        t = torch.tensor([500.0] * len(caps), device=p.device)
        ref = unet(x, t, context=self.full(caps))
        ctx, bias = self.compact(caps)
        self.install(bias)
        try:
            got = unet(x, t, context=ctx)
        finally:
            self.remove()
        err = (got - ref).abs().max().item()
        assert err < 1e-4 * max(1.0, ref.abs().max().item()), f"compact context differs from the plain UNet: {err}"
        log(f"compact context equals the plain UNet (max abs diff {err:.2e})")


def autocast(dev, cfg):
    """bfloat16 autocast for the recipe's ``amp: "bf16"`` (or ``"auto"`` where bf16 is native, ``native_bf16``;
    weights, optimizer and loss stay fp32), else a no-op."""
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16(dev, cfg))


def use_bf16(dev, cfg) -> bool:
    amp = cfg.get("amp", "")
    if amp not in ("", "bf16", "auto"):
        raise SystemExit(f"amp={amp!r}: expected 'auto', 'bf16' or ''")
    return amp == "bf16" or (amp == "auto" and native_bf16(dev))


def native_bf16(dev) -> bool:
    """Whether ``dev`` computes bfloat16 natively: a CUDA device that supports it, or a CPU whose flags (Linux
    /proc/cpuinfo) include avx512_bf16 or amx_bf16. Elsewhere bf16 autocast is emulated and slower than fp32."""
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if dev.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def snr_weight(alpha_bar, cfg):
    """The weight of each sample's eps loss, SNR = alpha_bar / (1 - alpha_bar) = 1 / sigma^2: Min-SNR-gamma,
    min(SNR, gamma) / SNR (ones when the recipe's min_snr is 0), times min(1 + 1 / SNR, high_noise_cap) when that
    cap is set."""
    snr = alpha_bar / (1 - alpha_bar)
    gamma = float(cfg.get("min_snr", 0.0))   # 0: no Min-SNR, i.e. gamma = inf (min(SNR, inf) / SNR = 1 exactly)
    return min_snr_weight(snr, gamma if gamma > 0 else math.inf, high_noise_cap=float(cfg.get("high_noise_cap", 0.0)))


def unet_inputs(vae_sd, e):
    """The UNet's input for TAESD encoder output e, exactly as ComfyUI computes it at sampling time:
    SD15 latent format x 0.18215 of (e / vae_scale + vae_shift)."""
    return (e / vae_sd["vae_scale"].float() + vae_sd["vae_shift"].float()) * tw_model.VAE_SCALE


def build_latents(cfg, vae_path, dev):
    """Latents + per-cell loss weights + scenes of the base renders 0..n_images-1 (deterministic from the seeds).
    Kept in ``<stage dir>/unet.latents.ckpt`` (git-ignored) keyed by the VAE file and the data recipe, so a resumed
    run does not render and encode the set again (about 15 minutes on the 2-core CPU)."""
    import hashlib

    from safetensors.torch import load_file

    key = {"vae": hashlib.sha256(Path(vae_path).read_bytes()).hexdigest()[:16],
           **{k: cfg[k] for k in ("size", "n_images", "subject_weight")}}
    cache = Path(vae_path).parent / "unet.latents.ckpt"
    if cache.is_file():
        hit = torch.load(cache, map_location="cpu", weights_only=False)
        if hit.get("key") == key:
            log("latents from", cache)
            return hit["lat"], hit["wts"], hit["scenes"]
    lat, wts, caps_scenes = _render_latents(cfg, load_file(str(vae_path)), dev)
    tmp = cache.parent / f".{cache.name}.partial"
    torch.save({"key": key, "lat": lat, "wts": wts, "scenes": caps_scenes}, tmp)
    os.replace(tmp, cache)
    return lat, wts, caps_scenes


def _render_latents(cfg, vae_sd, dev):
    enc = tw_model.new_taesd()
    enc.load_state_dict({k: v.float() for k, v in vae_sd.items()})
    enc.to(dev).eval()
    lat, wts, caps_scenes = [], [], []
    f = cfg["size"] // (cfg["size"] // 8)
    with torch.no_grad():
        for s0 in range(0, cfg["n_images"], 128):
            imgs, masks, _, sc = scenes.batch(range(s0, min(s0 + 128, cfg["n_images"])), cfg["size"])
            lat.append(unet_inputs(vae_sd, enc.taesd_encoder(to_tensor(imgs).to(dev))).cpu())
            m = F.avg_pool2d(torch.from_numpy(masks)[:, None], f)
            wts.append(1.0 + cfg["subject_weight"] * m)    # per latent cell: 1 + w * subject coverage
            caps_scenes += sc
    lat, wts = torch.cat(lat), torch.cat(wts)
    log("latents", tuple(lat.shape), f"mean {lat.mean().item():.3f} std {lat.std().item():.3f}")
    return lat, wts, caps_scenes


@functools.lru_cache(maxsize=1)
def text_encoder():
    """The toy CLIP, built once per process (about 2 s; the UNet stage only reads it to encode captions)."""
    return tw_model.build_clip()


def train_unet(cfg, a, stop, dev):
    from scripts.models import init_random_

    out = Path(a.out)
    ckpt_path = out / "unet.ckpt"
    torch.manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])
    log("bf16 autocast:", "on" if use_bf16(dev, cfg) else "off", f"(amp {cfg.get('amp')!r})")
    log("rendering + encoding", cfg["n_images"], "base images")
    lat, wts, caps_scenes = build_latents(cfg, out / "vae.safetensors", dev)
    latent = cfg["size"] // 8
    clip = text_encoder()
    bm = tw_model.model_config(tw_model.UNET_CONFIG_V2).get_model({})
    unet = bm.diffusion_model
    init_random_(unet, cfg["seed"])
    with torch.no_grad():   # zero-init the output conv: start as a "predict 0" model (stable early training)
        unet.out[-1].weight.zero_()
        unet.out[-1].bias.zero_()
    if cfg.get("init"):   # continue from saved (EMA) weights with a fresh optimizer: a warm restart, recorded
        init_sd = load_init(cfg["init"])
        unet.load_state_dict({k: v.float() for k, v in init_sd.items()})
        log("initialised from", cfg["init"])
    unet.to(dev)
    unet.requires_grad_(True)   # current ComfyUI's BaseModel freezes its diffusion model when it builds it
    acp = _alphas_cumprod(bm)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg["lr"], weight_decay=0.0)
    ema_sd = {k: v.detach().clone() for k, v in unet.state_dict().items()}   # EMA of the weights: what is saved
    step, avg, rescheduled = 0, None, []
    if a.resume:
        ck = load_checkpoint(ckpt_path, cfg, a.reschedule)
        rescheduled = ck.get("rescheduled", [])
        unet.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        ema_sd = {k: v.to(dev) for k, v in ck["ema"].items()}
        set_rng_state(rng, ck["rng"], dev)
        step, avg = ck["step"], ck["avg"]
    cc = CompactContext(clip, unet)
    cc.check(unet, ["", "a photo of a big red striped ball on the beach", "a photo of a cube in the snow"], latent)
    t0 = time.time()

    def checkpoint(final=False):
        save_checkpoint(ckpt_path, model=unet.state_dict(), opt=opt.state_dict(), ema=ema_sd, step=step, avg=avg,
                        cfg=cfg, rng=rng_state(rng, dev), rescheduled=rescheduled)
        meta = {"stage": "unet", "config": cfg, "steps_done": step, "complete": json.dumps(final)}
        if rescheduled:   # [[at step, old total, new total], ...]
            meta["rescheduled"] = rescheduled
        save(ema_sd, out / "unet.safetensors", meta)

    unet.train()
    amp = autocast(dev, cfg)   # decided once (native_bf16 reads /proc/cpuinfo), entered every step
    while step < cfg["steps"] and not stop():
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        idx = rng.integers(0, len(lat), cfg["batch"])
        x0 = lat[idx].to(dev)
        caps = ["" if rng.random() < cfg["p_uncond"] else scenes.random_caption(caps_scenes[i], rng) for i in idx]
        ctx, bias = cc.compact(caps)
        cc.install(bias)
        t = torch.from_numpy(rng.integers(0, 1000, cfg["batch"]))
        al = acp[t].view(-1, 1, 1, 1).to(dev)
        eps = torch.randn(x0.shape).to(dev)
        xt = al.sqrt() * x0 + (1 - al).sqrt() * eps
        with amp:
            pred = unet(xt, t.float().to(dev), context=ctx).float()
        w = wts[idx].to(dev)
        per_sample = (((pred - eps) ** 2) * w).mean(dim=(1, 2, 3)) / w.mean()
        loss = (per_sample * snr_weight(al.view(-1), cfg)).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(cfg["ema"], (1 + step) / (10 + step))
            for k, v in unet.state_dict().items():
                ema_sd[k].mul_(d).add_(v.detach(), alpha=1 - d) if v.is_floating_point() else ema_sd[k].copy_(v)
        plain = per_sample.mean().item()   # the unweighted loss, comparable across recipes
        avg = plain if avg is None else 0.98 * avg + 0.02 * plain
        if step % 25 == 0:
            log(f"unet step {step} loss {avg:.4f} lr {lr_at(cfg, step):.2e} ({time.time() - t0:.0f}s)")
        step += 1
        if step % cfg["save_every"] == 0 and step < cfg["steps"]:
            checkpoint()
    cc.remove()
    checkpoint(final=step >= cfg["steps"])


# ------------------------------------------------------------------------------------------------ scorers

def scorer_scenes(rng, B):
    """One scorer batch's scenes: B training scenes for the classifier, and B/2 training instances x 2 views
    (restaged: different pose / scale / background) for the contrastive embedder."""
    return scenes.training_scenes(rng, B), [scenes.restage(inst, rng) for inst in scenes.training_scenes(rng, B // 2)
                                             for _v in range(2)]


def train_scorers(cfg, a, stop, dev):
    out = Path(a.out)
    ckpt_path = out / "scorers.ckpt"
    torch.manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])
    cls_net, emb_net = tw_scorers.ClassBgNet().to(dev), tw_scorers.InstanceNet().to(dev)
    opt = torch.optim.AdamW(list(cls_net.parameters()) + list(emb_net.parameters()), lr=cfg["lr"], weight_decay=1e-4)
    step = 0
    if a.resume:
        ck = load_checkpoint(ckpt_path, cfg, a.reschedule)
        cls_net.load_state_dict(ck["classifier"])
        emb_net.load_state_dict(ck["embedder"])
        opt.load_state_dict(ck["opt"])
        set_rng_state(rng, ck["rng"], dev)
        step = ck["step"]
    B, t0 = cfg["batch"], time.time()

    def checkpoint(final=False):
        save_checkpoint(ckpt_path, classifier=cls_net.state_dict(), embedder=emb_net.state_dict(),
                        opt=opt.state_dict(), step=step, cfg=cfg, rng=rng_state(rng, dev))
        sd = {f"classifier.{k}": v for k, v in cls_net.state_dict().items()}
        sd.update({f"embedder.{k}": v for k, v in emb_net.state_dict().items()})
        save(sd, out / "scorers.safetensors", {"stage": "scorers", "config": cfg, "steps_done": step,
                                               "complete": json.dumps(final)})

    while step < cfg["steps"] and not stop():
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        sc, pairs = scorer_scenes(rng, B)
        x = tw_scorers.augment(to_tensor(np.stack([scenes.render(s, cfg["size"])[0] for s in sc])), rng).to(dev)
        yc = torch.tensor([scenes.CLASSES.index(s.cls) for s in sc], device=dev)
        yb = torch.tensor([list(scenes.BACKGROUNDS).index(s.background) for s in sc], device=dev)
        lc, lb = cls_net(x)
        loss_c = F.cross_entropy(lc, yc) + F.cross_entropy(lb, yb)
        # contrastive batch: B/2 instances x 2 views (different pose / scale / background)
        views = [scenes.render(v, cfg["size"])[0] for v in pairs]
        z = emb_net(tw_scorers.augment(to_tensor(np.stack(views)), rng).to(dev))
        sim = z @ z.t() / cfg["temperature"]
        sim.fill_diagonal_(-1e4)
        target = torch.arange(B, device=dev) ^ 1
        loss_e = F.cross_entropy(sim, target)
        loss = loss_c + loss_e
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0:
            acc_c = (lc.argmax(1) == yc).float().mean().item()
            acc_b = (lb.argmax(1) == yb).float().mean().item()
            acc_e = (sim.argmax(1) == target).float().mean().item()
            log(f"scorers step {step} cls {loss_c.item():.3f} (acc c {acc_c:.2f} b {acc_b:.2f}) "
                f"nce {loss_e.item():.3f} (top1 {acc_e:.2f}) ({time.time() - t0:.0f}s)")
        step += 1
        if step % cfg["save_every"] == 0 and step < cfg["steps"]:
            checkpoint()
    checkpoint(final=step >= cfg["steps"])


# ------------------------------------------------------------------------------------------------ segmenter

def segmenter_scenes(rng, n):
    """The segmenter's training scenes (fresh renders and the VAE pool alike): scenes.training_scenes, never a
    held-out emblem."""
    return scenes.training_scenes(rng, n)


def render_scenes(scs, size):
    out = [scenes.render(sc, size) for sc in scs]
    return to_tensor(np.stack([o[0] for o in out])), torch.from_numpy(np.stack([o[1] for o in out]))[:, None]


@torch.no_grad()
def vae_round_trip(net, x, dev, chunk=8):
    """Images NCHW through the toy VAE (TAESD encoder then decoder, what ComfyUI's encode / decode compute: the
    scale / shift cancel), clamped to 0..1, on the CPU."""
    return torch.cat([net.taesd_decoder(net.taesd_encoder(x[i:i + chunk].to(dev))).clamp(0, 1).cpu()
                      for i in range(0, len(x), chunk)])


def segmenter_vae_pool(cfg, out, dev):
    """cfg['vae_pool'] training renders (their own seed) and their VAE round trips, cached next to the weights keyed
    by the VAE file and the recipe, so that a resumed run does not round-trip them again."""
    import hashlib

    if not cfg["vae_pool"]:
        return torch.zeros(0, 3, cfg["size"], cfg["size"]), torch.zeros(0, 1, cfg["size"], cfg["size"])
    vae_path = REPO / cfg["vae"] if not os.path.isabs(cfg["vae"]) else Path(cfg["vae"])
    key = {"vae": hashlib.sha256(vae_path.read_bytes()).hexdigest()[:16],
           **{k: cfg[k] for k in ("size", "vae_pool", "seed")}}
    cache = Path(out) / "segmenter.vaepool.ckpt"
    if cache.is_file():
        hit = torch.load(cache, map_location="cpu", weights_only=False)
        if hit.get("key") == key:
            log("VAE round-trip pool from", cache)
            return hit["x"], hit["m"]
    t0 = time.time()
    x, m = render_scenes(segmenter_scenes(np.random.default_rng([cfg["seed"], 0x9001]), cfg["vae_pool"]), cfg["size"])
    x = vae_round_trip(_load_taesd(vae_path).to(dev).eval(), x, dev)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.parent / f".{cache.name}.partial"
    torch.save({"key": key, "x": x, "m": m}, tmp)
    os.replace(tmp, cache)
    log(f"VAE round-trip pool: {len(x)} renders through {cfg['vae']} ({time.time() - t0:.0f}s)")
    return x, m


def segmenter_augment(x, rng, cfg):
    """Blur (a down/up-sampled copy mixed in, p_blur), colour jitter (per-channel gain, brightness, saturation) and
    Gaussian noise; parameters from the numpy generator, noise from torch's (both checkpointed)."""
    n = x.shape[0]
    f = rng.uniform(0.25, 0.6)
    small = F.interpolate(F.interpolate(x, scale_factor=f, mode="bilinear", antialias=True), size=x.shape[-2:],
                          mode="bilinear")
    w = torch.from_numpy(rng.uniform(0.3, 1, n) * (rng.random(n) < cfg["p_blur"])).float().view(-1, 1, 1, 1)
    x = x * (1 - w) + small * w
    j = cfg["jitter"]
    gain = torch.from_numpy(rng.uniform(1 - j, 1 + j, (n, 3, 1, 1))).float()
    bias = torch.from_numpy(rng.uniform(-j / 2, j / 2, (n, 1, 1, 1))).float()
    sat = torch.from_numpy(rng.uniform(1 - 2 * j, 1 + j, (n, 1, 1, 1))).float()
    grey = x.mean(dim=1, keepdim=True)
    x = grey + (x - grey) * sat
    sigma = torch.from_numpy(rng.uniform(0, cfg["noise"], (n, 1, 1, 1))).float()
    return (x * gain + bias + torch.randn(x.shape) * sigma).clamp(0, 1)


def segmenter_batch(rng, cfg, pool):
    """One training batch (images NCHW, masks N1HW): batch - vae_per_batch fresh renders of training scenes and
    vae_per_batch VAE round trips from the pool (flipped at random), all augmented."""
    n_pool = min(cfg["vae_per_batch"], cfg["batch"]) if len(pool[0]) else 0
    x, m = render_scenes(segmenter_scenes(rng, cfg["batch"] - n_pool), cfg["size"])
    if n_pool:
        idx = rng.integers(0, len(pool[0]), n_pool)
        flip = torch.from_numpy(rng.random(n_pool) < 0.5)
        px, pm = pool[0][idx].clone(), pool[1][idx].clone()
        px[flip], pm[flip] = px[flip].flip(-1), pm[flip].flip(-1)
        x, m = torch.cat([x, px]), torch.cat([m, pm])
    return segmenter_augment(x, rng, cfg), m


def segmenter_loss(logits, m, dice_weight):
    """BCE against the renders' soft (anti-aliased) masks + soft Dice over each image."""
    bce = F.binary_cross_entropy_with_logits(logits, m)
    p = torch.sigmoid(logits)
    inter, tot = (p * m).sum(dim=(1, 2, 3)), (p + m).sum(dim=(1, 2, 3))
    dice = 1 - ((2 * inter + 1) / (tot + 1)).mean()
    return bce + dice_weight * dice, bce, dice


def train_segmenter(cfg, a, stop, dev):
    from personalize.toyworld import segmenter

    out = Path(a.out)
    ckpt_path = out / "segmenter.ckpt"
    torch.manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])
    pool = segmenter_vae_pool(cfg, out, dev)
    net = segmenter.build().to(dev)
    log(f"segmenter: {sum(p.numel() for p in net.parameters()) / 1e6:.3f} M parameters")
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=1e-4)
    step, avg = 0, None
    if a.resume:
        ck = load_checkpoint(ckpt_path, cfg, a.reschedule)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        set_rng_state(rng, ck["rng"], dev)
        step, avg = ck["step"], ck["avg"]
    t0 = time.time()

    def checkpoint(final=False):
        save_checkpoint(ckpt_path, model=net.state_dict(), opt=opt.state_dict(), step=step, avg=avg, cfg=cfg,
                        rng=rng_state(rng, dev))
        meta = {"stage": "segmenter", "config": cfg, "steps_done": step, "complete": json.dumps(final)}
        if final and cfg["eval_refs"]:
            meta["eval"] = eval_segmenter(net.eval(), cfg, dev)
            net.train()
        save(net.state_dict(), out / "segmenter.safetensors", meta)

    net.train()
    while step < cfg["steps"] and not stop():
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        x, m = segmenter_batch(rng, cfg, pool)
        loss, bce, dice = segmenter_loss(net(x.to(dev)), m.to(dev), cfg["dice"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        avg = loss.item() if avg is None else 0.9 * avg + 0.1 * loss.item()
        if step % 10 == 0:
            log(f"segmenter step {step} loss {avg:.4f} (bce {bce.item():.4f} dice {dice.item():.4f}) "
                f"lr {lr_at(cfg, step):.2e} ({time.time() - t0:.0f}s)")
        step += 1
        if step % cfg["save_every"] == 0 and step < cfg["steps"]:
            checkpoint()
    checkpoint(final=step >= cfg["steps"])


def iou(pred, gt):
    """Per-image IoU of binary masks [B, H, W] (the ground truth: render mask > 0.5)."""
    pred, gt = pred > 0.5, gt > 0.5
    return ((pred & gt).sum(dim=(1, 2)).float() / (pred | gt).sum(dim=(1, 2)).clamp(min=1).float())


@torch.no_grad()
def eval_segmenter(net, cfg, dev, vae_path=None):
    """IoU on the 12 held-out subjects' reference renders (scenes.subject_references, eval_refs each, at the
    recipe's size: evaluation only, never trained on), on their VAE round trips, and on fresh training-distribution
    renders (their own seed). Prints and returns {set: {"mean", "min", "worst"}}."""
    from personalize.toyworld import segmenter

    n = cfg["eval_refs"]
    refs = [(s.name, r) for s in scenes.SUBJECTS for r in scenes.subject_references(s, n, size=cfg["size"])]
    x = torch.from_numpy(np.stack([r[0] for _, r in refs]))
    gt = torch.from_numpy(np.stack([r[1] for _, r in refs]))
    vae_path = Path(vae_path or (REPO / cfg["vae"] if not os.path.isabs(cfg["vae"]) else cfg["vae"]))
    rt = vae_round_trip(_load_taesd(vae_path).to(dev).eval(), x.permute(0, 3, 1, 2), dev).permute(0, 2, 3, 1)
    vx, vm = render_scenes(segmenter_scenes(np.random.default_rng([cfg["seed"], 0xE7A1]), 12 * n), cfg["size"])
    sets = {"held-out subject renders": (x, gt, [nm for nm, _ in refs]),
            "held-out subject VAE round trips": (rt, gt, [nm for nm, _ in refs]),
            "training-distribution renders": (vx.permute(0, 2, 3, 1), vm[:, 0], None)}
    res = {}
    for name, (imgs, masks, names) in sets.items():
        v = iou(segmenter.predict(net, imgs), masks)
        worst = names[int(v.argmin())] if names else None
        res[name] = {"mean": round(v.mean().item(), 4), "min": round(v.min().item(), 4), "worst": worst}
        if names:
            per = {}
            for nm, val in zip(names, v.tolist()):
                per.setdefault(nm, []).append(val)
            res[name]["per_subject"] = {nm: round(float(np.mean(vals)), 4) for nm, vals in per.items()}
        log(f"segmenter IoU, {name} ({len(v)} images at {cfg['size']} px): mean {v.mean().item():.4f}, "
            f"min {v.min().item():.4f}" + (f" ({worst})" if worst else ""))
    return res


def measure_segmenter(cfg, a, stop, dev):
    from personalize.toyworld import segmenter

    path = Path(a.segmenter or (Path(a.out) / "segmenter.safetensors"))
    if a.size:
        cfg["size"] = a.size
    log("segmenter", path)
    print(json.dumps(eval_segmenter(segmenter.load(path).to(dev), cfg, dev, a.vae), indent=1))


# ------------------------------------------------------------------------------------------------ measurement

@torch.no_grad()
def vae_ceiling(vae_path, size, scorer_path=None, seeds=2, grid=None):
    """Subject fidelity (instance embedder) of the 12 held-out subjects' real renders (the 10 benchmark prompts x
    ``seeds``, as scripts/bench_quality.py draws them) and of their VAE round-trips at ``size`` px, against the
    subject's 4 reference renders. Returns {subject: (real, round_trip)}; ``grid`` (a list) receives, per subject, 4
    real renders over their round-trips."""
    from safetensors.torch import load_file

    from personalize.toyworld.scorers import Scorers

    sc = Scorers(str(scorer_path) if scorer_path else None)
    vae = tw_model.build_vae(load_file(str(vae_path)))
    res = {}
    for s in scenes.SUBJECTS:
        refs = torch.from_numpy(np.stack([r[0] for r in scenes.subject_references(s, size=size)]))
        real = torch.from_numpy(scenes.prompt_renders(s, seeds, size))
        rt = vae.decode(vae.encode(real)).float().clamp(0, 1).reshape(real.shape)
        res[s.name] = (sc.subject_fidelity(real, refs), sc.subject_fidelity(rt, refs))
        if grid is not None:
            grid.append(torch.cat([torch.cat([real[i], rt[i]], dim=0) for i in range(0, min(len(real), 8), 2)], dim=1))
    return res


def measure_vae(cfg, a, stop, dev):
    path = Path(a.vae or (Path(a.out) / "vae.safetensors"))
    grid = [] if a.save_grid else None
    res = vae_ceiling(path, a.size or cfg["size"], a.scorers, seeds=a.seeds, grid=grid)
    if grid:
        from PIL import Image

        rows = [torch.cat(grid[i:i + 3], dim=1) for i in range(0, len(grid), 3)]
        Image.fromarray((torch.cat(rows, dim=0).numpy() * 255).round().astype(np.uint8)).save(a.save_grid)
        log("grid (per subject: 4 real renders over their VAE round-trips, 3 subjects a row):", a.save_grid)
    for name, (real, rt) in res.items():
        print(f"{name:10s} real {real:.3f}  round-trip {rt:.3f}")
    r = np.array(list(res.values()))
    worst = min(res, key=lambda k: res[k][1])
    print(f"VAE {path} at {a.size or cfg['size']} px, scorer {a.scorers or 'weights/toyworld/scorers.safetensors'}: "
          f"real renders {r[:, 0].mean():.3f}, round-trips mean {r[:, 1].mean():.3f}, worst {worst} {res[worst][1]:.3f}")


@torch.no_grad()
def unet_check(unet_path, vae_path, scorers_path, seeds=1, steps=20, cfg_scale=5.0):
    """Base generations of the class prompts 'a photo of a <class> <background>' (6 classes x 6 backgrounds x
    ``seeds``, ComfyUI's KSampler: euler, normal, 20 steps, cfg ``cfg_scale``; seed 100 * class + 10 * background
    + k), scored by the scorers' class and background heads: (images [N, H, W, 3], class accuracy, background
    accuracy, {class or background name: accuracy of its images on that head})."""
    from safetensors.torch import load_file

    from personalize.toyworld.scorers import Scorers

    model = tw_model.build_unet(load_file(str(unet_path)), unet_config=tw_model.UNET_CONFIG_V2)
    clip, vae = tw_model.build_clip(), tw_model.build_vae(load_file(str(vae_path)))
    imgs, cls, bgs = [], [], []
    for ci, c in enumerate(scenes.CLASSES):
        for bi, (b, phrase) in enumerate(scenes.BACKGROUNDS.items()):
            for k in range(seeds):
                imgs.append(tw_model.generate(model, clip, vae, f"a photo of a {c} {phrase}", 100 * ci + 10 * bi + k,
                                              size=CONFIG["unet"]["size"], steps=steps, cfg=cfg_scale))
                cls.append(c)
                bgs.append(b)
    imgs = torch.cat(imgs)
    hc, hb = Scorers(str(scorers_path)).prompt_hits(imgs, cls, bgs)   # one classifier pass, grouped below
    per = {c: hc[torch.tensor([x == c for x in cls])].float().mean().item() for c in scenes.CLASSES}
    per.update({b: hb[torch.tensor([x == b for x in bgs])].float().mean().item() for b in scenes.BACKGROUNDS})
    return imgs, hc.float().mean().item(), hb.float().mean().item(), per


def measure_unet(cfg, a, stop, dev):
    out = Path(a.out)
    unet_path = Path(a.unet or out / "unet.safetensors")
    scorers_path = Path(a.scorers or out / "scorers.safetensors")
    imgs, acc_c, acc_b, per = unet_check(unet_path, Path(a.vae or out / "vae.safetensors"), scorers_path,
                                          seeds=a.seeds, cfg_scale=a.cfg)
    if a.save_grid:
        from PIL import Image

        n = len(scenes.BACKGROUNDS) * a.seeds   # one row per class
        s = imgs.shape[1]
        g = imgs.view(len(scenes.CLASSES), n, s, s, 3).permute(0, 2, 1, 3, 4).reshape(len(scenes.CLASSES) * s, n * s, 3)
        Image.fromarray((g.numpy() * 255).round().astype(np.uint8)).save(a.save_grid)
        log("grid (a row per class, a column per background x seed):", a.save_grid)
    print(f"UNet {unet_path}: {imgs.shape[0]} class-prompt images, scorer {scorers_path}: "
          f"cfg {a.cfg:g}, class {acc_c:.3f}, background {acc_b:.3f}")
    print("  class accuracy of each class's images: " + ", ".join(f"{c} {per[c]:.2f}" for c in scenes.CLASSES))
    print("  background accuracy of each background's images: "
          + ", ".join(f"{b} {per[b]:.2f}" for b in scenes.BACKGROUNDS))


STAGES = {"vae": train_vae, "unet": train_unet, "scorers": train_scorers, "segmenter": train_segmenter,
          "vae-ceiling": measure_vae, "segmenter-eval": measure_segmenter, "unet-check": measure_unet}


def _value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=list(STAGES))
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's step count (sets the schedule)")
    ap.add_argument("--minutes", type=float, default=1e9, help="stop after this much wall time (checkpoint saved)")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="stop after this many steps of this run (checkpoint saved), as a time limit would")
    ap.add_argument("--resume", action="store_true", help="continue exactly from <out>/<stage>.ckpt")
    ap.add_argument("--reschedule", action="store_true",
                    help="with --resume and --steps: continue a checkpoint written with another step count on the "
                         "new schedule (recorded in the weights' metadata)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe entry (JSON value), e.g. --set batch=8 --set init=")
    ap.add_argument("--out", default=str(WEIGHTS_DIR), help="where weights and checkpoints go")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vae", default=None, help="vae-ceiling, segmenter-eval, unet-check: the VAE file (default "
                                                "<out>/vae.safetensors; segmenter-eval: the recipe's)")
    ap.add_argument("--segmenter", default=None,
                    help="segmenter-eval: the segmenter file (default <out>/segmenter.safetensors)")
    ap.add_argument("--size", type=int, default=None, help="vae-ceiling, segmenter-eval: image size (default the recipe's)")
    ap.add_argument("--scorers", default=None, help="vae-ceiling: scorer file (default weights/toyworld's); "
                                                    "unet-check: default <out>/scorers.safetensors")
    ap.add_argument("--cfg", type=float, default=5.0, help="unet-check: the guidance scale (default 5, the bench's)")
    ap.add_argument("--unet", default=None, help="unet-check: the UNet file (default <out>/unet.safetensors)")
    ap.add_argument("--seeds", type=int, default=2, help="vae-ceiling: renders per benchmark prompt; unet-check: "
                                                         "images per class x background prompt")
    ap.add_argument("--save-grid", default=None, help="vae-ceiling: PNG of real renders over their round-trips")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    cfg = dict(CONFIG[{"vae-ceiling": "vae", "segmenter-eval": "segmenter", "unet-check": "unet"}.get(a.stage, a.stage)])
    for kv in a.set:
        k, _, v = kv.partition("=")
        if k not in cfg:
            raise SystemExit(f"--set {kv}: the {a.stage} recipe has no entry {k!r} (it has {sorted(cfg)})")
        cfg[k] = _value(v)
    if a.steps:
        cfg["steps"] = a.steps
    log("stage", a.stage, json.dumps(cfg), "device", dev)
    stop = Stop(a.minutes, a.stop_after)
    old = stop.install() if threading.current_thread() is threading.main_thread() else {}
    try:
        STAGES[a.stage](cfg, a, stop, dev)
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


if __name__ == "__main__":
    main()
