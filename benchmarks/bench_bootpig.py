"""BootPIG speed benchmark: 20-step sampling, plain ComfyUI vs BootPIG RSA variants, same model, same run.

    python -m benchmarks.bench_bootpig                 # CUDA: SD1.5 512x512 and SDXL 1024x1024, random full-size weights
    python -m benchmarks.bench_bootpig --tiny --cpu    # smoke run on tiny models (what CI-class machines can do)

Prints seconds per 20-step sampling (median of --repeats after a warm-up), the ratio to plain sampling and the peak
GPU memory. Variants:
- rsa_shared:   reference-attention mode (the checkpoint's own UNet reads the reference; reference rows batched
                into the base UNet call), per-step re-noising
- rsa_separate: a separately loaded reference UNet (what BootPIG Loader gives), one extra pass per step
- rsa_once:     reference features encoded once per run and reused
- rsa_3branch:  rsa_shared + BootPIG's three-branch guidance (one more batch per step)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

from benchmarks.common import add_sampling_args, device, resolution, time_sampling  # noqa: E402


def main(argv=None):
    p = add_sampling_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--refs", type=int, default=1, help="number of reference images")
    a = p.parse_args(argv)
    cuda = device(a, f"references {a.refs}")
    import torch

    import comfy.model_management as mm
    from personalize.nodes.reference_attention import ReferenceSet, RSASettings, apply_rsa
    from scripts import models

    print(f"{'family':6} {'res':>5} {'variant':13} {'seconds':>8} {'ratio':>6} {'peak GiB':>9}")
    dtype = torch.float16 if cuda else torch.float32

    def build(fam):
        m = models.build_model(fam, tiny=a.tiny, seed=0)
        if cuda:
            m.model.diffusion_model.to(dtype)
            m.model.manual_cast_dtype = None
        return m

    for fam in a.families.split(","):
        res = resolution(fam, a.tiny)
        model = build(fam)
        lat = res // 8
        g = torch.Generator().manual_seed(0)
        latents = model.model.process_latent_in(torch.randn(a.refs, 4, lat, lat, generator=g))
        reference = ReferenceSet(latents=latents, white=torch.zeros(4), encoder=model, family=fam)
        sep_model = build(fam)  # the same weights loaded a second time: the trained-reference-UNet path
        separate = ReferenceSet(latents=latents, white=torch.zeros(4), encoder=sep_model, family=fam)
        pos = models.random_conditioning(fam, seed=1, width=res, height=res)
        neg = models.random_conditioning(fam, seed=2, width=res, height=res)
        once = float(model.get_model_object("model_sampling").percent_to_sigma(0.5))
        variants = {
            "plain": model,
            "rsa_shared": apply_rsa(model, reference, RSASettings(batched=True)),
            "rsa_separate": apply_rsa(model, separate, RSASettings(batched=False)),
            "rsa_once": apply_rsa(model, reference, RSASettings(batched=True, features="once", once_sigma=once)),
            "rsa_3branch": apply_rsa(model, reference, RSASettings(batched=True), 5.0, 7.5),
        }
        base_time = None
        for name, m in variants.items():
            sec, peak = time_sampling(m, a, cuda, pos, neg, (lat, lat))
            base_time = base_time or sec
            print(f"{fam:6} {res:5d} {name:13} {sec:8.3f} {sec / base_time:6.2f} {peak:9.2f}", flush=True)
        del variants, sep_model
        mm.unload_all_models()
        mm.soft_empty_cache()


if __name__ == "__main__":
    main()
