"""Train the toy world's model and scorers (CPU is enough; a GPU is used when there is one).

    .venv/bin/python scripts/train_toyworld.py vae      # TAESD-architecture VAE on toy renders
    .venv/bin/python scripts/train_toyworld.py unet     # the SD1.5-family UNet on VAE latents of base renders
    .venv/bin/python scripts/train_toyworld.py scorers  # class/background classifier + instance embedder

Each stage reads its recipe from CONFIG below (override with --steps / --minutes), writes
weights/toyworld/<stage>.safetensors (fp16, atomically) with the recipe in the file's metadata.
Every image is drawn procedurally from a seed (toyworld/scenes.py): nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from scripts import host  # noqa: E402

host.bootstrap()
sys.path.append(str(REPO))   # after ComfyUI: top-level `toyworld` (ComfyUI's own `nodes` stays first)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from toyworld import model as tw_model  # noqa: E402
from toyworld import scenes  # noqa: E402

CONFIG = {
    # subject_weight: the loss counts pixels (latent cells for the UNet) inside the subject's mask 1 + subject_weight
    # times, so the few cells that carry the subject's shape and colour are not drowned by background texture.
    "vae": {"steps": 2400, "batch": 16, "crop": 64, "lr": 1e-3, "lr_end": 5e-5, "p_emblem": 0.3,
            "latent_noise": 0.1, "reg": 0.01, "subject_weight": 2.0, "seed": 1},
    "decoder": {"steps": 1500, "batch": 12, "crop": 32, "lr": 5e-4, "lr_end": 2e-5, "p_emblem": 0.3,
                "latent_noise": 0.1, "subject_weight": 2.0, "seed": 4},
    "unet": {"steps": 3500, "batch": 64, "lr": 1e-3, "lr_end": 5e-5, "n_images": 12000, "p_uncond": 0.1,
             "subject_weight": 3.0, "ema": 0.999, "seed": 2},
    "scorers": {"steps": 2000, "batch": 48, "lr": 6e-4, "lr_end": 3e-5, "temperature": 0.1, "seed": 3},
}


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


_DEADLINE = {"t0": time.time(), "seconds": float("inf")}


def lr_at(cfg, step, steps):
    """Cosine decay over the run's progress: the larger of steps done and wall time used (so a --minutes limit
    still ends the schedule at lr_end)."""
    frac = max(step / steps, (time.time() - _DEADLINE["t0"]) / _DEADLINE["seconds"])
    return cfg["lr_end"] + 0.5 * (cfg["lr"] - cfg["lr_end"]) * (1 + math.cos(math.pi * min(frac, 1.0)))


def save(tensors, name, meta):
    from safetensors.torch import save_file

    out = Path(tw_model.WEIGHTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.tmp"
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()})
    os.replace(tmp, out / name)
    log("saved", out / name, f"{(out / name).stat().st_size / 1e6:.2f} MB")


def to_tensor(imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).float()


def render_mixed(rng, n, p_emblem):
    """n random scenes (a share with random non-held-out emblems): (images NCHW, subject masks N1HW)."""
    imgs, masks = [], []
    for _ in range(n):
        emb = scenes.random_emblem(rng) if rng.random() < p_emblem else None
        img, m = scenes.render(scenes.sample_scene(rng, emblem=emb))
        imgs.append(img)
        masks.append(m)
    return to_tensor(np.stack(imgs)), torch.from_numpy(np.stack(masks))[:, None]


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

def train_vae(cfg, steps, minutes):
    torch.manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])
    net = tw_model.new_taesd()
    from scripts.models import init_random_

    init_random_(net.taesd_encoder, cfg["seed"])
    init_random_(net.taesd_decoder, cfg["seed"] + 1)
    from comfy.taesd.taesd import Block

    with torch.no_grad():   # zero-init each residual branch's last conv: every Block starts as identity (trainable
        for mod in net.modules():   # depth without normalization layers, much faster convergence from scratch)
            if isinstance(mod, Block):
                mod.conv[-1].weight.zero_()
                mod.conv[-1].bias.zero_()
    params = list(net.taesd_encoder.parameters()) + list(net.taesd_decoder.parameters())
    opt = torch.optim.Adam(params, lr=cfg["lr"])
    t0, step = time.time(), 0
    while step < steps and time.time() - _DEADLINE["t0"] < minutes * 60:
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step, steps)
        x, m = crop(rng, cfg["crop"], *render_mixed(rng, cfg["batch"], cfg["p_emblem"]))
        e = net.taesd_encoder(x)                                   # what the UNet sees (x0.18215 cancels vae_scale)
        z = e + cfg["latent_noise"] * torch.randn_like(e)
        y = net.taesd_decoder(z)
        rec = weighted_rec(y, x, m, cfg["subject_weight"])
        mu, var = e.mean(dim=(0, 2, 3)), e.var(dim=(0, 2, 3))
        reg = (mu ** 2).mean() + ((var - 1) ** 2).mean()
        loss = rec + cfg["reg"] * reg
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0:
            log(f"vae step {step} rec {rec.item():.4f} reg {reg.item():.3f} std {var.mean().sqrt().item():.2f}")
        if step % 500 == 499:
            save(net.state_dict(), "vae.safetensors", {"stage": "vae", "config": cfg, "steps_done": step + 1})
        step += 1
    sd = {k: v for k, v in net.state_dict().items()}
    save(sd, "vae.safetensors", {"stage": "vae", "config": cfg, "steps_done": step,
                                 "minutes": round((time.time() - t0) / 60, 1)})


def train_decoder(cfg, steps, minutes):
    """Fine-tune the VAE decoder with the encoder frozen: the latent space (and so a UNet trained on it) is unchanged."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    torch.manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])
    path = os.path.join(tw_model.WEIGHTS_DIR, "vae.safetensors")
    vae_sd = load_file(path)
    with safe_open(path, "pt") as f:
        meta = dict(f.metadata() or {})
    net = tw_model.new_taesd()
    net.load_state_dict({k: v.float() for k, v in vae_sd.items()})
    net.taesd_encoder.requires_grad_(False)
    opt = torch.optim.Adam(net.taesd_decoder.parameters(), lr=cfg["lr"])
    step = 0
    while step < steps and time.time() - _DEADLINE["t0"] < minutes * 60:
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step, steps)
        x, m = crop(rng, cfg["crop"], *render_mixed(rng, cfg["batch"], cfg["p_emblem"]))
        with torch.no_grad():
            e = net.taesd_encoder(x)
        y = net.taesd_decoder(e + cfg["latent_noise"] * torch.randn_like(e))
        rec = weighted_rec(y, x, m, cfg["subject_weight"])
        opt.zero_grad()
        rec.backward()
        opt.step()
        if step % 25 == 0:
            log(f"decoder step {step} rec {rec.item():.4f}")
        step += 1
    sd = {k: v for k, v in net.state_dict().items()}
    sd["vae_scale"], sd["vae_shift"] = vae_sd["vae_scale"], vae_sd["vae_shift"]   # keep the calibration
    meta["decoder_finetune"] = json.dumps({"config": cfg, "steps_done": step})
    save(sd, "vae.safetensors", meta)


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

    def __init__(self, clip, unet):
        self.clip, self.cache, self.bias = clip, {}, None
        self.modules = [m for n, m in unet.named_modules() if n.endswith("attn2")]
        self.originals = [m.forward for m in self.modules]

    def full(self, caps):
        with torch.no_grad():
            return torch.cat([self.clip.encode_from_tokens(self.clip.tokenize(c)) for c in caps])

    def compact(self, caps):
        rows = []
        for c in caps:
            if c not in self.cache:
                full = self.full([c])[0]
                u, counts = torch.unique(full, dim=0, return_counts=True)
                self.cache[c] = (u, counts.float().log())
            rows.append(self.cache[c])
        n = max(r[0].shape[0] for r in rows)
        ctx = torch.zeros(len(caps), n, rows[0][0].shape[1])
        bias = torch.full((len(caps), n), float("-inf"))
        for i, (u, lb) in enumerate(rows):
            ctx[i, :len(u)], bias[i, :len(u)] = u, lb
        return ctx, bias

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
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias[:, None, None, :].to(q.dtype))
            return mod.to_out(out.transpose(1, 2).reshape(b, x.shape[1], -1))
        return forward

    @torch.no_grad()
    def check(self, unet, caps):
        x, t = torch.randn(len(caps), 4, tw_model.LATENT_SIZE, tw_model.LATENT_SIZE), torch.tensor([500.0] * len(caps))
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


def train_unet(cfg, steps, minutes):
    from safetensors.torch import load_file

    from scripts.models import init_random_

    seed = cfg["seed"] + (1000 if cfg.get("resume") else 0)   # a resumed run draws new batches
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae_sd = load_file(os.path.join(tw_model.WEIGHTS_DIR, "vae.safetensors"))
    enc = tw_model.new_taesd()
    enc.load_state_dict({k: v.float() for k, v in vae_sd.items()})
    enc.eval()
    log("rendering + encoding", cfg["n_images"], "base images")
    lat, wts, caps_scenes = [], [], []
    with torch.no_grad():
        for s0 in range(0, cfg["n_images"], 256):
            imgs, masks, _, sc = scenes.batch(range(s0, min(s0 + 256, cfg["n_images"])))
            lat.append(enc.taesd_encoder(to_tensor(imgs)))
            m = F.avg_pool2d(torch.from_numpy(masks)[:, None], tw_model.IMAGE_SIZE // tw_model.LATENT_SIZE)
            wts.append(1.0 + cfg["subject_weight"] * m)    # per latent cell: 1 + w * subject coverage
            caps_scenes += sc
    lat, wts = torch.cat(lat), torch.cat(wts)
    # calibrate the VAE so that the SD1.5 latent format (x0.18215) hands the UNet zero-mean unit-std latents:
    # encode() = e / vae_scale + vae_shift, decode(x) = decoder((x - vae_shift) * vae_scale)
    mu, sd = lat.mean().item(), lat.std().item()
    vae_sd["vae_scale"] = torch.tensor(tw_model.VAE_SCALE * sd)
    vae_sd["vae_shift"] = torch.tensor(-mu / (tw_model.VAE_SCALE * sd))
    from safetensors import safe_open

    with safe_open(os.path.join(tw_model.WEIGHTS_DIR, "vae.safetensors"), "pt") as f:
        meta = dict(f.metadata() or {})
    meta["calibrated"] = json.dumps({"mean": mu, "std": sd})
    save(vae_sd, "vae.safetensors", meta)
    lat = (lat - mu) / sd
    log("latents", tuple(lat.shape), "raw mean", mu, "std", sd, "-> unit")
    clip = tw_model.build_clip()
    bm = tw_model.model_config().get_model({})
    unet = bm.diffusion_model
    prev = os.path.join(tw_model.WEIGHTS_DIR, "unet.safetensors")
    if cfg.get("resume") and os.path.isfile(prev):     # continue training from the saved weights
        unet.load_state_dict({k: v.float() for k, v in load_file(prev).items()})
        log("resumed from", prev)
    else:
        init_random_(unet, cfg["seed"])
        with torch.no_grad():   # zero-init the output conv: start as a "predict 0" model (stable early training)
            unet.out[-1].weight.zero_()
            unet.out[-1].bias.zero_()
    acp = _alphas_cumprod(bm)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg["lr"], weight_decay=0.0)
    cc = CompactContext(clip, unet)
    cc.check(unet, ["", "a photo of a big red striped ball on the beach", "a photo of a cube in the snow"])
    ema_sd = {k: v.detach().clone() for k, v in unet.state_dict().items()}   # EMA of the weights: what is saved
    t0, step, ema = time.time(), 0, None
    unet.train()
    while step < steps and time.time() - _DEADLINE["t0"] < minutes * 60:
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step, steps)
        idx = rng.integers(0, len(lat), cfg["batch"])
        x0 = lat[idx]
        caps = ["" if rng.random() < cfg["p_uncond"] else scenes.random_caption(caps_scenes[i], rng) for i in idx]
        ctx, bias = cc.compact(caps)
        cc.install(bias)
        t = torch.from_numpy(rng.integers(0, 1000, cfg["batch"]))
        a = acp[t].view(-1, 1, 1, 1)
        eps = torch.randn_like(x0)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = unet(xt, t.float(), context=ctx)
        w = wts[idx]
        loss = (((pred - eps) ** 2) * w).mean() / w.mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(cfg["ema"], (1 + step) / (10 + step))
            for k, v in unet.state_dict().items():
                ema_sd[k].mul_(d).add_(v.detach(), alpha=1 - d) if v.is_floating_point() else ema_sd[k].copy_(v)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 25 == 0:
            log(f"unet step {step} loss {ema:.4f} ({time.time() - t0:.0f}s)")
        if step % 300 == 299:
            save(ema_sd, "unet.safetensors", {"stage": "unet", "config": cfg, "steps_done": step + 1})
        step += 1
    cc.remove()
    save(ema_sd, "unet.safetensors", {"stage": "unet", "config": cfg, "steps_done": step,
                                                  "minutes": round((time.time() - t0) / 60, 1)})


# ------------------------------------------------------------------------------------------------ scorers

def train_scorers(cfg, steps, minutes):
    from toyworld import scorers

    torch.manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])
    cls_net, emb_net = scorers.ClassBgNet(), scorers.InstanceNet()
    prev = os.path.join(tw_model.WEIGHTS_DIR, "scorers.safetensors")
    if cfg.get("resume") and os.path.isfile(prev):     # continue training from the shipped weights
        old = scorers.Scorers(prev)
        cls_net.load_state_dict(old.cls_net.state_dict())
        emb_net.load_state_dict(old.emb_net.state_dict())
        log("resumed from", prev)
    opt = torch.optim.AdamW(list(cls_net.parameters()) + list(emb_net.parameters()), lr=cfg["lr"], weight_decay=1e-4)
    t0, step = time.time(), 0
    B = cfg["batch"]
    while step < steps and time.time() - _DEADLINE["t0"] < minutes * 60:
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step, steps)
        # classifier batch: base + emblem scenes
        sc = [scenes.sample_scene(rng, emblem=scenes.random_emblem(rng) if rng.random() < 0.3 else None)
              for _ in range(B)]
        x = scorers.augment(to_tensor(np.stack([scenes.render(s)[0] for s in sc])), rng)
        yc = torch.tensor([scenes.CLASSES.index(s.cls) for s in sc])
        yb = torch.tensor([list(scenes.BACKGROUNDS).index(s.background) for s in sc])
        lc, lb = cls_net(x)
        loss_c = F.cross_entropy(lc, yc) + F.cross_entropy(lb, yb)
        # contrastive batch: B/2 instances x 2 views (different pose / scale / background)
        views = []
        for _ in range(B // 2):
            inst = scenes.sample_scene(rng, emblem=scenes.random_emblem(rng) if rng.random() < 0.7 else None)
            for _v in range(2):
                views.append(scenes.render(scenes.restage(inst, rng))[0])
        z = emb_net(scorers.augment(to_tensor(np.stack(views)), rng))
        sim = z @ z.t() / cfg["temperature"]
        sim.fill_diagonal_(-1e4)
        target = torch.arange(B) ^ 1
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
                f"nce {loss_e.item():.3f} (top1 {acc_e:.2f})")
        step += 1
    sd = {f"classifier.{k}": v for k, v in cls_net.state_dict().items()}
    sd.update({f"embedder.{k}": v for k, v in emb_net.state_dict().items()})
    save(sd, "scorers.safetensors", {"stage": "scorers", "config": cfg, "steps_done": step,
                                     "minutes": round((time.time() - t0) / 60, 1)})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=list(CONFIG))
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    ap.add_argument("--minutes", type=float, default=1e9, help="stop (and save) after this much wall time")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true", help="unet / scorers: continue from the saved weights")
    ap.add_argument("--lr", type=float, default=None, help="override the recipe's peak learning rate")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = dict(CONFIG[a.stage])
    steps = a.steps or cfg["steps"]
    cfg["steps"] = steps
    if a.resume:
        cfg["resume"] = True
    if a.lr:
        cfg["lr"] = a.lr
    log("stage", a.stage, json.dumps(cfg))
    _DEADLINE.update(t0=time.time(), seconds=a.minutes * 60)
    {"vae": train_vae, "decoder": train_decoder, "unet": train_unet, "scorers": train_scorers}[a.stage](cfg, steps, a.minutes)


if __name__ == "__main__":
    main()
