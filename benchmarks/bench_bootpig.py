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
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

from scripts import host  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="sd15,sdxl")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny models (smoke test), small latents")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--refs", type=int, default=1, help="number of reference images")
    a = p.parse_args(argv)
    host.bootstrap(cpu=a.cpu)
    import torch

    import comfy.model_management as mm
    import nodes
    from personalize.nodes.reference_attention import ReferenceSet, RSASettings, apply_rsa
    from scripts import models

    dev = mm.get_torch_device()
    cuda = dev.type == "cuda"
    print(f"device: {torch.cuda.get_device_name(dev) if cuda else 'cpu'}; torch {torch.__version__}; "
          f"steps {a.steps}; references {a.refs}; {'tiny' if a.tiny else 'full-size'} random weights")
    print(f"{'family':6} {'res':>5} {'variant':13} {'seconds':>8} {'ratio':>6} {'peak GiB':>9}")
    for fam in a.families.split(","):
        res = (64 if fam == "sd15" else 128) if a.tiny else (512 if fam == "sd15" else 1024)
        dtype = torch.float16 if cuda else torch.float32
        model = models.build_model(fam, tiny=a.tiny, seed=0)
        if cuda:
            model.model.diffusion_model.to(dtype)
            model.model.manual_cast_dtype = None
        bm = model.model
        lat = res // 8
        g = torch.Generator().manual_seed(0)
        latents = bm.process_latent_in(torch.randn(a.refs, 4, lat, lat, generator=g))
        reference = ReferenceSet(latents=latents, white=torch.zeros(4), encoder=model, family=fam)
        sep_model = models.build_model(fam, tiny=a.tiny, seed=0)  # the same weights, loaded a second time
        if cuda:
            sep_model.model.diffusion_model.to(dtype)
            sep_model.model.manual_cast_dtype = None
        separate = ReferenceSet(latents=latents, white=torch.zeros(4), encoder=sep_model, family=fam)
        pos = models.random_conditioning(fam, seed=1, width=res, height=res)
        neg = models.random_conditioning(fam, seed=2, width=res, height=res)
        ms = model.get_model_object("model_sampling")
        once = float(ms.percent_to_sigma(0.5))
        variants = {
            "plain": model,
            "rsa_shared": apply_rsa(model, reference, RSASettings(batched=True)),
            "rsa_separate": apply_rsa(model, separate, RSASettings(batched=False)),
            "rsa_once": apply_rsa(model, reference, RSASettings(batched=True, features="once", once_sigma=once)),
            "rsa_3branch": apply_rsa(model, reference, RSASettings(batched=True), 5.0, 7.5),
        }
        base_time = None
        for name, m in variants.items():
            times = []
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for r in range(a.repeats + 1):
                latent = {"samples": torch.zeros(1, 4, lat, lat)}
                if cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                with torch.inference_mode():
                    nodes.common_ksampler(m, 1, a.steps, 5.0, "euler", "normal", pos, neg, latent)
                if cuda:
                    torch.cuda.synchronize()
                if r > 0:
                    times.append(time.perf_counter() - t)
            sec = statistics.median(times)
            base_time = base_time or sec
            peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")
            print(f"{fam:6} {res:5d} {name:13} {sec:8.3f} {sec / base_time:6.2f} {peak:9.2f}", flush=True)
        del variants, sep_model
        mm.unload_all_models()
        mm.soft_empty_cache()


if __name__ == "__main__":
    main()
