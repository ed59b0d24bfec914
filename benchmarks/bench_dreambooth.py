"""DreamBooth-LoRA training speed: this pack's trainer vs a plain PyTorch loop written the way diffusers'
``train_dreambooth_lora.py`` works, same UNet, same run.

    python -m benchmarks.bench_dreambooth              # CUDA: SD1.5 512x512, rank 4, batch 1 + 1 class image
    python -m benchmarks.bench_dreambooth --tiny --cpu # smoke run on tiny models

Random full-size weights (scripts/models.py); nothing is downloaded. Rows:
- ``comfyui forward``: one plain ComfyUI UNet forward (inference, batch 2), for scale;
- ``reference``: diffusers-style step: VAE-encode the instance + class pixels and run the text encoder *every step*
  (diffusers' defaults: no latent cache, no --pre_compute_text_embeddings), PEFT-style LoRA (lora_A/lora_B,
  gaussian init, alpha = rank) on to_q/to_k/to_v/to_out.0, fp16 autocast with GradScaler (accelerate's fp16),
  AdamW (torch defaults), clip_grad_norm 1.0, ``loss.detach().item()`` logged every step;
- ``diffusers+peft``: the same with diffusers' UNet2DConditionModel and PEFT's ``add_adapter`` when both libraries
  are installed (skipped otherwise; they are not dependencies of the pack);
- ``personalize <dtype>``: ``nodes.dreambooth.train`` (latents and text embeddings computed once, fused AdamW, losses
  synced every 10 steps, pinned host->device copies).

Prints steps/s (after --warmup steps), ms/step, ratio to the reference and the peak GPU memory of each run.
Goal (issue 5): personalize >= 1.3x the reference's steps/s at <= its peak memory.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

from scripts import host  # noqa: E402

DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
            "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def build_vae(tiny: bool):
    from scripts import models

    if tiny:
        return models.build_vae(seed=2)
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    net = AutoencoderKL(ddconfig=DDCONFIG, embed_dim=4)
    models.init_random_(net, 2)
    return comfy.sd.VAE(sd=net.state_dict())


def sync(cuda):
    import torch

    if cuda:
        torch.cuda.synchronize()


def peak(cuda):
    import torch

    return torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")


def reset_peak(cuda):
    import torch

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class PeftStyleLoRA:
    """What PEFT's LoraLayer computes for nn.Linear: base(x) + lora_B(lora_A(dropout(x))) * scaling."""

    @staticmethod
    def wrap(layer, r, alpha, g):
        import torch

        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.base_layer = layer
                self.lora_A = torch.nn.Linear(layer.in_features, r, bias=False, device=layer.weight.device)
                self.lora_B = torch.nn.Linear(r, layer.out_features, bias=False, device=layer.weight.device)
                with torch.no_grad():
                    self.lora_A.weight.copy_(torch.randn(self.lora_A.weight.shape, generator=g) / r)  # "gaussian"
                    self.lora_B.weight.zero_()
                self.scaling = alpha / r

            def forward(self, x):
                return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling

        return M()


def reference_loop(model, clip, vae, pixels, tokens, steps, warmup, cuda, rank=4, lr=1e-4):
    """diffusers train_dreambooth_lora.py, with_prior_preservation, batch 1 + 1 class image, fp16 mixed precision."""
    import torch

    from personalize.nodes import dreambooth, lora

    bm = model.model
    dev = model.load_device
    names = dreambooth.unet_layer_names(model, "attention")
    unet = lora.trainable_copy(bm.diffusion_model)
    g = torch.Generator().manual_seed(0)
    params = []
    for path in names:
        w = PeftStyleLoRA.wrap(unet.get_submodule(path), rank, rank, g)
        lora._set(unet, path, w)
        params += [w.lora_A.weight, w.lora_B.weight]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    te = clip.cond_stage_model
    enc = vae.first_stage_model
    vae_dtype = next(enc.parameters()).dtype
    ac = torch.float16 if cuda else torch.bfloat16
    alphas = 1.0 / (1.0 + bm.model_sampling.sigmas.float().to(dev) ** 2)
    pix = pixels.movedim(-1, 1).to(dev) * 2 - 1  # [instance; class] pixels
    t0 = time.perf_counter()
    for step in range(steps):
        sync(cuda) if step == warmup else None
        t0 = time.perf_counter() if step == warmup else t0
        with torch.no_grad():
            latents = enc.encode(pix.to(vae_dtype)).float() * 0.18215  # every step, as diffusers does
            ctx = torch.cat([te.encode_token_weights(tk)[0] for tk in tokens]).to(dev)
        noise = torch.randn_like(latents)
        t = torch.randint(0, alphas.shape[0], (latents.shape[0],), device=dev)
        ab = alphas[t].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
        with torch.autocast(device_type=dev.type, dtype=ac, enabled=cuda):
            pred = unet(noisy, t.float(), context=ctx, transformer_options={})
        p_inst, p_cls = pred.float().chunk(2)
        n_inst, n_cls = noise.chunk(2)
        loss = torch.nn.functional.mse_loss(p_inst, n_inst) + 1.0 * torch.nn.functional.mse_loss(p_cls, n_cls)
        if scaler:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        _ = loss.detach().item()  # diffusers logs the loss every step
    sync(cuda)
    return (steps - warmup) / (time.perf_counter() - t0)


def diffusers_loop(res, steps, warmup, cuda, rank=4, lr=1e-4):
    """The same step on diffusers' UNet2DConditionModel (SD1.5 config, random weights) with PEFT's add_adapter."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    dev = torch.device("cuda" if cuda else "cpu")
    unet = UNet2DConditionModel(sample_size=res // 8, cross_attention_dim=768).to(dev, torch.float16 if cuda else
                                                                                    torch.float32)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    lat = torch.randn(2, 4, res // 8, res // 8, device=dev)
    ctx = torch.randn(2, 77, 768, device=dev)
    t0 = time.perf_counter()
    for step in range(steps):
        sync(cuda) if step == warmup else None
        t0 = time.perf_counter() if step == warmup else t0
        noise = torch.randn_like(lat)
        t = torch.randint(0, 1000, (2,), device=dev)
        with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=cuda):
            pred = unet(lat + noise * 0.5, t, ctx).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        (scaler.step(opt), scaler.update()) if scaler else opt.step()
        opt.zero_grad(set_to_none=True)
        _ = loss.detach().item()
    sync(cuda)
    return (steps - warmup) / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="tiny models, 64 px (smoke test)")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--dtypes", default="fp16,bf16", help="training dtypes of the pack's trainer to time")
    a = p.parse_args(argv)
    host.bootstrap(cpu=a.cpu)
    import torch

    import comfy.model_management as mm
    from personalize.nodes import dreambooth
    from scripts import models

    dev = mm.get_torch_device()
    cuda = dev.type == "cuda"
    res = 64 if a.tiny else 512
    warm = min(a.warmup, max(0, a.steps - 1))
    print(f"device: {torch.cuda.get_device_name(dev) if cuda else 'cpu'}; torch {torch.__version__}; SD1.5 {res}px; "
          f"rank 4; batch 1 + 1 class image; {a.steps} steps ({warm} warm-up); "
          f"{'tiny' if a.tiny else 'full-size'} random weights")
    model = models.build_model("sd15", tiny=a.tiny, seed=0)
    if cuda:
        model.model.diffusion_model.to(torch.float16)
        model.model.manual_cast_dtype = None
    clip = models.build_clip(tiny=a.tiny, seed=1)
    vae = build_vae(a.tiny)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, res, res, 3, generator=g)
    tokens = [clip.tokenize("a photo of sks dog"), clip.tokenize("a photo of dog")]
    mm.load_models_gpu([model], force_full_load=True)
    clip.load_model()
    vae.first_stage_model.to(dev)

    rows = []
    # plain ComfyUI forward, batch 2, for scale
    reset_peak(cuda)
    x = torch.randn(2, 4, res // 8, res // 8, device=dev)
    ctx = torch.randn(2, 77, 768, device=dev)
    sig = model.model.model_sampling.sigmas[500].to(dev).expand(2)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(a.steps):
            sync(cuda) if i == warm else None
            t0 = time.perf_counter() if i == warm else t0
            model.model.apply_model(x, sig, c_crossattn=ctx)
        sync(cuda)
        rows.append(("comfyui forward (b2)", (a.steps - warm) / (time.perf_counter() - t0), peak(cuda)))

    reset_peak(cuda)
    ref = reference_loop(model, clip, vae, pixels, tokens, a.steps, warm, cuda)
    rows.append(("reference (diffusers-style)", ref, peak(cuda)))
    try:
        import diffusers  # noqa: F401
        import peft  # noqa: F401
    except ImportError:
        print("diffusers+peft: not installed, row skipped")
    else:
        reset_peak(cuda)
        rows.append(("diffusers+peft", diffusers_loop(res, a.steps, warm, cuda), peak(cuda)))

    for dt in a.dtypes.split(","):
        dt = dt if cuda else "fp32"
        stamps = {}

        def on_step(step, total, *_):
            stamps[step] = time.perf_counter()

        cfg = dreambooth.TrainConfig(steps=a.steps, resolution=res, num_class_images=1, class_steps=2, rank=4,
                                   alpha=4.0, learning_rate=1e-4, batch_size=1, training_dtype=dt, checkpoint_every=0)
        reset_peak(cuda)
        with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
            dreambooth.train(model, clip, vae, list(pixels[:1]), cfg, f"{tmp}/bench.safetensors", None,
                           overwrite=True, on_step=on_step)
        first = min((s for s in stamps if s >= max(1, warm)), default=min(stamps))
        last = max(stamps)
        sps = (last - first) / (stamps[last] - stamps[first]) if last > first else float("nan")
        rows.append((f"personalize {dt}", sps, peak(cuda)))
        if not cuda:
            break

    print(f"{'variant':28} {'steps/s':>8} {'ms/step':>8} {'vs ref':>7} {'peak GiB':>9}")
    for name, sps, pk in rows:
        ratio = sps / ref if math.isfinite(sps) else float("nan")
        print(f"{name:28} {sps:8.2f} {1000 / sps:8.1f} {ratio:7.2f} {pk:9.2f}")
    print("goal: personalize >= 1.3x the reference's steps/s at <= its peak memory")


if __name__ == "__main__":
    main()
