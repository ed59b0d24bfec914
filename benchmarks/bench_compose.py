"""Speed of the four-technique graph (example_workflows/toyworld_four_techniques.json) against plain sampling of the
same toy model in the same run:

    python -m benchmarks.bench_compose --cpu             # the toy world model, 64x64, batch 2, 20 steps
    python -m benchmarks.bench_compose                   # the same on CUDA

Variants, each adding to the previous one: plain -> + DreamBooth LoRA (stock LoraLoader) -> + Subject-Diffusion
(Expand + Location Mask Concat + Adapter) -> + BootPIG RSA -> + Pick-and-Draw appearance + layout (the whole graph);
plus BootPIG's three-branch guider instead of the KSampler's CFG. Prints the median seconds per sampling run over
--repeats runs after a warm-up, the ratio to plain, and the peak GPU memory (of all variants).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

from benchmarks.common import add_sampling_args, device, timed  # noqa: E402

PROMPT = "a photo of a sks ball on the beach"
BOX = "8, 8, 48, 48"
VISION = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": 64, "image_size": 224,
          "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 128, "layer_norm_eps": 1e-5,
          "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": 2,
          "patch_size": 14, "projection_dim": 32, "torch_dtype": "float32"}


def main(argv=None):
    p = add_sampling_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), families="toyworld")
    p.add_argument("--batch", type=int, default=2)
    a = p.parse_args(argv)
    cuda = device(a, f"batch {a.batch}; toy world model (trained weights if shipped), 64x64")
    import torch

    import comfy.clip_vision
    import comfy.sample
    import comfy.samplers
    import folder_paths
    import nodes as core

    from personalize import bootpig_nodes as B
    from personalize import pick_and_draw_nodes as P
    from personalize import subject_diffusion_nodes as SD
    from personalize import toy_world_nodes as TW
    from personalize.nodes import lora
    from personalize.nodes.weights_io import save_atomic
    from scripts import models

    def run_node(cls, **kw):
        with torch.inference_mode():
            return getattr(cls(), cls.FUNCTION)(**kw)

    tmp = Path(tempfile.mkdtemp(prefix="bench_compose_"))
    folder_paths.folder_names_and_paths["loras"] = ([str(tmp)], {".safetensors"})
    folder_paths.filename_list_cache.pop("loras", None)
    source = "trained" if __import__("personalize.toyworld.model", fromlist=["x"]).weights_present() \
        else "random (untrained)"
    model, clip, vae = run_node(TW.ToyWorldLoader, source=source)
    images, masks, _, _ = run_node(TW.ToyWorldSubject, subject="ball_00", references=1, prompt_index=1)
    unet = model.model.diffusion_model
    with torch.inference_mode(False):   # a LoRA file as the DreamBooth trainer writes it (rank 4, attention layers)
        names = lora.unet_target_names(unet, model.model.model_config.unet_config, "attention")
        mods = lora.inject(lora.trainable_copy(unet), names, 4, 4.0, seed=0)
        with torch.no_grad():
            for m in mods.values():
                m.lora_up.normal_(0, 0.02)
        save_atomic(lora.state_dict(mods), str(tmp / "toyworld_sks_ball.safetensors"))
    (tmp / "vision.json").write_text(json.dumps(VISION))
    cv = comfy.clip_vision.ClipVisionModel(str(tmp / "vision.json"))
    models.init_random_(cv.model, seed=3)
    latent = {"samples": torch.zeros(a.batch, 4, 8, 8)}
    with torch.inference_mode():
        pos = core.CLIPTextEncode().encode(clip, PROMPT)[0]
        neg = core.CLIPTextEncode().encode(clip, "")[0]

    variants = {"plain": model}
    m, c2 = run_node(core.LoraLoader, model=model, clip=clip, lora_name="toyworld_sks_ball.safetensors",
                     strength_model=1.0, strength_clip=1.0)
    variants["+ DreamBooth LoRA"] = m
    m = run_node(SD.ExpandInputChannels, model=m)[0]
    m = run_node(SD.LocationMaskConcat, model=m, latent=latent, boxes=BOX)[0]
    w = run_node(SD.SubjectDiffusionInitWeights, model=m, clip_vision=cv)[0]
    m = run_node(SD.SubjectAdapter, model=m, weights=w, clip_vision=cv, image=images, mask=masks, boxes=BOX,
                 latent=latent)[0]
    variants["+ Subject-Diffusion"] = m
    ref = run_node(B.BootPIGReferenceEncoder, model=m, vae=vae, images=images, mask=masks, resolution=64)[0]
    m = run_node(B.BootPIGRSAPatch, model=m, reference=ref)[0]
    variants["+ BootPIG RSA"] = m
    rsa_model = m
    pd_ref = run_node(P.PickAndDrawReference, model=m, vae=vae, image=images, mask=masks, resolution=64)[0]
    m = run_node(P.AppearancePickingGuidance, model=m, reference=pd_ref, clip=c2, prompt=PROMPT, subject_word="sks",
                 start_percent=0.0, end_percent=0.5, step_size=5.0, layers="decoder", reference_noise="renoise")[0]
    m = run_node(P.LayoutDrawingGuidance, model=m, clip=c2, prompt=PROMPT, subject_word="sks", class_word="ball",
                 start_percent=0.0, end_percent=0.5, step_size=5.0, layers="decoder")[0]
    variants["+ Pick-and-Draw (all four)"] = m

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", a.steps).cpu()

    def sampler(guider):
        def run():
            lat = torch.zeros(a.batch, 4, 8, 8)
            with torch.inference_mode():
                guider.sample(comfy.sample.prepare_noise(lat, 1), lat, comfy.samplers.sampler_object("euler"),
                              sigmas, seed=1, disable_pbar=True)
        return run

    def cfg(mm):
        g = comfy.samplers.CFGGuider(mm)
        g.set_conds(pos, neg)
        g.set_cfg(5.0)
        return g

    print(f"{'variant':36} {'seconds':>8} {'ratio':>6} {'peak GiB':>9}")
    base = None
    runs = [(k, sampler(cfg(v))) for k, v in variants.items()]
    tb = run_node(B.BootPIGThreeBranchGuider, model=m, positive=pos, negative=neg)[0]
    runs.append(("all four, three-branch guider", sampler(tb)))
    tb_rsa = run_node(B.BootPIGThreeBranchGuider, model=rsa_model, positive=pos, negative=neg)[0]
    runs.insert(4, ("+ BootPIG RSA, three-branch guider", sampler(tb_rsa)))
    # one variant after the other (warm-up, then --repeats timed runs): interleaving would make ComfyUI re-patch the
    # LoRA into the shared weights at every switch between models, which a real run of one graph never does
    times, peaks = {}, {}
    for name, run in runs:
        sec, peaks[name] = timed(run, a.repeats, cuda)
        times[name] = [sec]
    for name, _ in runs:
        sec = statistics.median(times[name])
        base = base or sec
        print(f"{name:36} {sec:8.3f} {sec / base:6.2f} {peaks[name]:9.2f}", flush=True)


if __name__ == "__main__":
    main()
