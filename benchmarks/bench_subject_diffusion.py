"""Subject-Diffusion speed benchmark: 20-step sampling, plain ComfyUI vs the Subject-Diffusion variants, same model,
same run.

    python -m benchmarks.bench_subject_diffusion                 # CUDA: SD1.5 512x512, SDXL 1024x1024, random weights
    python -m benchmarks.bench_subject_diffusion --tiny --cpu    # smoke run on tiny models

Prints seconds per sampling run (median of --repeats after a warm-up), the ratio to plain sampling and the peak GPU
memory. Variants:
- location:        Expand Input Channels + Location Mask Concat (5-channel conv_in, channel on every call)
- adapter_1:       location + gated self-attention adapters in every block, 1 reference (256 ViT-H tokens)
- adapter_2:       the same with 2 references (512 tokens, boxes used)
The adapters are zero-initialised (the cost of a trained adapter is the same: the gates only scale the result).
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
    a = p.parse_args(argv)
    cuda = device(a, "")
    import torch

    from personalize.nodes import adapters as ad
    from personalize.nodes import location as loc
    from scripts import models

    print(f"{'family':6} {'res':>5} {'variant':10} {'seconds':>8} {'ratio':>6} {'peak GiB':>9}")
    for fam in a.families.split(","):
        res = resolution(fam, a.tiny)
        model = models.build_model(fam, tiny=a.tiny, seed=0)
        if cuda:
            model.model.diffusion_model.to(torch.float16)
        h = w = res // 8
        lat = {"samples": torch.zeros(1, 4, h, w)}
        pos = models.random_conditioning(fam, seed=0, width=res, height=res)
        neg = models.random_conditioning(fam, seed=1, width=res, height=res)
        channel, _, _ = loc.build_channel(lat["samples"], f"{res // 8}, {res // 8}, {res // 2}, {res // 2}")
        located = loc.apply_location(loc.expand_model(model), channel)
        weights = ad.init_weights(model, 1280, 256, 1024)
        g = torch.Generator().manual_seed(0)
        tok1 = torch.randn(1, 256, 1280, generator=g)
        tok2 = torch.randn(2, 256, 1280, generator=g)
        variants = {
            "plain": model,
            "location": located,
            "adapter_1": ad.apply_adapters(located, weights, tok1, torch.tensor([[0.0, 0.0, 1.0, 1.0]])),
            "adapter_2": ad.apply_adapters(located, weights, tok2,
                                           torch.tensor([[0.1, 0.1, 0.5, 0.9], [0.5, 0.1, 0.9, 0.9]]), use_bbox=True),
        }
        base = None
        for name, m in variants.items():
            sec, peak = time_sampling(m, a, cuda, pos, neg, (h, w), cfg=7.5)
            base = base or sec
            print(f"{fam:6} {res:5d} {name:10} {sec:8.3f} {sec / base:6.2f} {peak:9.2f}", flush=True)


if __name__ == "__main__":
    main()
