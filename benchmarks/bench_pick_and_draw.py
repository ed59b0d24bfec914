"""Pick-and-Draw speed benchmark: 20-step sampling, plain ComfyUI vs guided over the first half of the steps.

    python -m benchmarks.bench_pick_and_draw                     # CUDA: SD1.5 512x512 (add --families sd15,sdxl)
    python -m benchmarks.bench_pick_and_draw --tiny --cpu --steps 4 --repeats 1   # smoke run on tiny models

Same model, same run, same seed: prints seconds per sampling (median of --repeats after a warm-up), the ratio to
plain sampling and the peak GPU memory. The UNet weights are made under ``torch.inference_mode()`` as ComfyUI's
checkpoint loader makes them, so the guided runs take the inference-tensor aliasing path real users get.
Variants (guidance on steps in [0, 50%), CFG 5, euler/normal, batch 1, one guided iteration per step):
- appearance_renoise:  Appearance Picking Guidance, reference re-noised per step (decoder_mid layers)
- appearance_ddim:     the same with DDIM inversion of the reference (one extra UNet pass per schedule step, once)
- layout:              Layout Drawing Guidance, every cross-attention layer, template = the model without patches
- both_renoise:        appearance + layout, one backward per guided step (the issue's headline configuration)
- both_ddim:           the same with DDIM inversion (the nodes' default reference_noise)
Anchor from the issue (H100, ComfyUI 0.3.75, random weights): forward+backward to the latent = 3.0x a forward on
SD1.5; naive guidance of half the steps ~2.4x plain; goal <= 2.0x.
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
    p = add_sampling_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), families="sd15")
    p.add_argument("--end-percent", type=float, default=0.5, help="guided range is [0, end)")
    p.add_argument("--variants", default="appearance_renoise,appearance_ddim,layout,both_renoise,both_ddim")
    a = p.parse_args(argv)
    cuda = device(a, f"guided [0, {a.end_percent})")
    import torch

    import comfy.model_management as mm
    from personalize.nodes import pick_and_draw as G
    from scripts import models

    print(f"{'family':6} {'res':>5} {'variant':19} {'seconds':>8} {'ratio':>6} {'peak GiB':>9} {'guided':>6}")
    for fam in a.families.split(","):
        res = resolution(fam, a.tiny)
        dtype = torch.float16 if cuda else torch.float32
        with torch.inference_mode():  # weights as inference tensors, like a checkpoint loaded by a node
            model = models.build_model(fam, tiny=a.tiny, seed=0)
            if cuda:
                model.model.diffusion_model.to(dtype)
                model.model.manual_cast_dtype = None
        lat = res // 8
        g = torch.Generator().manual_seed(0)
        bm = model.model
        ref_latent = bm.process_latent_in(torch.randn(1, 4, lat, lat, generator=g))
        mask = torch.zeros(lat, lat)
        mask[lat // 4: 3 * lat // 4, lat // 4: 3 * lat // 4] = 1
        reference = G.Reference(latent=ref_latent, mask=mask, family=fam)
        pos = models.random_conditioning(fam, seed=1, width=res, height=res)
        neg = models.random_conditioning(fam, seed=2, width=res, height=res)
        tmpl_ctx = models.random_conditioning(fam, seed=3)[0][0]
        steps_range = G.StepRange.from_percent(model, 0.0, a.end_percent)
        subject = (5,)

        def app(noise):
            return G.AppearanceTerm(weight=1.0, steps=steps_range, layers=G.parse_layers(model, "decoder_mid"),
                                    positions=subject, tau=0.5, step_size=20.0, schedule="linear_decay", iterations=1,
                                    reference=reference, reference_noise=noise, seed=0)

        lay = G.LayoutTerm(weight=1.0, steps=steps_range, layers=G.parse_layers(model, "all"), positions=subject,
                           template_positions=subject, template_context=tmpl_ctx, smoothing_sigma=0.5,
                           step_size=20.0, schedule="linear_decay")
        terms = {"appearance_renoise": [app("renoise")], "appearance_ddim": [app("ddim_inversion")],
                 "layout": [lay], "both_renoise": [app("renoise"), lay], "both_ddim": [app("ddim_inversion"), lay]}
        variants = {"plain": model}
        for name in [v for v in a.variants.split(",") if v]:
            m = model
            for t in terms[name]:
                m = G.add_term(m, t)
            variants[name] = m
        variants["plain_again"] = model  # plain is timed first and last: the ratio uses the faster of the two
        rows = []
        for name, m in variants.items():
            sec, peak = time_sampling(m, a, cuda, pos, neg, (lat, lat))
            guided = 0 if name.startswith("plain") else len(G.LAST_RUN_LOG)
            rows.append((name, sec, peak, guided))
        base_time = min(sec for name, sec, _, _ in rows if name.startswith("plain"))
        for name, sec, peak, guided in rows:
            print(f"{fam:6} {res:5d} {name:19} {sec:8.3f} {sec / base_time:6.2f} {peak:9.2f} {guided:6d}", flush=True)
        del variants
        mm.unload_all_models()
        mm.soft_empty_cache()


if __name__ == "__main__":
    main()
