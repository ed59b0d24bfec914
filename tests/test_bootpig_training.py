"""BootPIG training (nodes/bootpig_training.py) on tiny real-layout models: what trains, what the step computes, and
that trained weights reproduce the trainer's model through the BootPIG Loader + RSA Patch route in ComfyUI's
sampler."""
from __future__ import annotations

import pytest
import torch

from personalize.nodes import bootpig_training as T
from personalize.nodes import bootpig_weights, introspect
from personalize.nodes import forward_process as fp
from personalize.nodes import training_engine as engine
from personalize.nodes.training_engine import UNetCall
from scripts import models


def batch(family="sd15", B=2, drop=False, seed=0, hw=8):
    g = torch.Generator().manual_seed(seed)
    D = models.context_dim(family)
    out = {"x0": torch.randn(B, 4, hw, hw, generator=g), "noise": torch.randn(B, 4, hw, hw, generator=g),
           "sigma": torch.tensor([0.9, 3.0][:B] + [1.5] * max(0, B - 2)),
           "context": torch.randn(B, 77, D, generator=g), "drop_reference": drop}
    out.update(r0=torch.randn(B, 4, hw, hw, generator=g), ref_noise=torch.randn(B, 4, hw, hw, generator=g),
               ref_context=torch.randn(B, 77, D, generator=g))
    return out


class FixedBatch:
    """A trainer whose every step sees one fixed batch (the engine's duck-typed Trainer)."""

    find_unused_parameters = True

    def __init__(self, module, groups, b):
        self.module, self.groups, self.b = module, groups, b

    def param_groups(self):
        return self.groups

    def batch(self, step, part, parts):
        return self.b


def plain_loss(model, b):
    """The base UNet's own diffusion loss on the batch (no reference anywhere), through ComfyUI's model path."""
    bm = introspect.base_model(model)
    ms = bm.model_sampling
    call = UNetCall(bm, bm.diffusion_model)
    conds = [(b["context"][i:i + 1], {"pooled_output": None}) for i in range(b["x0"].shape[0])]
    with torch.no_grad():
        pred = call(fp.noisy(ms, b["sigma"], b["x0"], b["noise"]), b["sigma"], conds, [1] * len(conds)).float()
        return torch.nn.functional.mse_loss(pred, fp.target(ms, b["sigma"], b["x0"], b["noise"]))


def test_one_step_changes_exactly_the_reference_unet_and_the_base_attn1(tiny_sd15):
    before = {k: v.clone() for k, v in introspect.base_model(tiny_sd15).diffusion_model.state_dict().items()}
    cfg = T.BootPIGConfig(steps=1, reference_unet_lr=1e-3, rsa_lr=1e-3, warmup_steps=0, checkpoint_every=0)
    step, ref_p, rsa_p = T.build_step(tiny_sd15, cfg, 64)
    groups = T.BootPIGTrainer(step, ref_p, rsa_p, cfg, None, None).groups
    assert [g.name for g in groups] == ["reference_unet", "rsa"]
    assert len(rsa_p) == len([k for k in before if ".attn1." in k]) > 0
    assert len(ref_p) == len([k for k, v in before.items() if v.is_floating_point()])
    engine.run(FixedBatch(step, groups, batch()), T.engine_config(cfg), "cpu", progress=False)
    ref_after, base_after = step.reference_unet.state_dict(), step.base_unet.state_dict()
    base_changed = {k for k in before if not torch.equal(base_after[k].to(before[k].dtype), before[k])}
    ref_changed = {k for k in before if not torch.equal(ref_after[k].to(before[k].dtype), before[k])}
    attn1 = {k for k in before if ".attn1." in k}
    assert base_changed == attn1                       # every attn1 projection of the base UNet, nothing else
    # the reference UNet trains wherever its features reach the loss: every layer before the last attn1 input it
    # feeds; the last block's own attn1 comes after it and never reaches the loss
    last = introspect.transformer_blocks(tiny_sd15)[-1]
    last_prefix = f"{last.name}_blocks.{last.id}." if last.name != "middle" else "middle_block."
    assert {k for k in ref_changed if ".attn1." in k} == {k for k in attn1 if not k.startswith(last_prefix)}
    assert any(k.startswith("input_blocks.0.") for k in ref_changed) and "time_embed.0.weight" in ref_changed
    assert not any(k.startswith("out.") for k in ref_changed)   # its output is discarded: never trained
    # the model the graph holds is untouched
    now = introspect.base_model(tiny_sd15).diffusion_model.state_dict()
    assert all(torch.equal(now[k], before[k]) for k in before)


@pytest.mark.parametrize("which", ["rsa_only", "reference_unet_only"])
def test_ablations_train_only_their_part(tiny_sd15, which):
    before = {k: v.clone() for k, v in introspect.base_model(tiny_sd15).diffusion_model.state_dict().items()}
    cfg = T.BootPIGConfig(steps=1, reference_unet_lr=1e-3, rsa_lr=1e-3, warmup_steps=0, checkpoint_every=0,
                          train_reference_unet=which == "reference_unet_only", train_rsa=which == "rsa_only")
    step, ref_p, rsa_p = T.build_step(tiny_sd15, cfg, 64)
    groups = T.BootPIGTrainer(step, ref_p, rsa_p, cfg, None, None).groups
    assert [g.name for g in groups] == (["rsa"] if which == "rsa_only" else ["reference_unet"])
    engine.run(FixedBatch(step, groups, batch()), T.engine_config(cfg), "cpu", progress=False)
    ref_same = all(torch.equal(step.reference_unet.state_dict()[k].to(v.dtype), v) for k, v in before.items())
    base_same = all(torch.equal(step.base_unet.state_dict()[k].to(v.dtype), v) for k, v in before.items())
    assert (ref_same, base_same) == ((True, False) if which == "rsa_only" else (False, True))


def test_with_the_reference_dropped_the_loss_is_the_base_unets_plain_loss(tiny_sd15):
    cfg = T.BootPIGConfig()
    step, _, _ = T.build_step(tiny_sd15, cfg, 64)
    b = batch(drop=True)
    with torch.no_grad():
        got = step(b)["loss"]
        with_ref = step({**b, "drop_reference": False})["loss"]
    want = plain_loss(tiny_sd15, b)
    assert abs(got.item() - want.item()) <= 1e-6 * max(1.0, want.item())
    assert abs(with_ref.item() - want.item()) > 1e-4        # the reference really enters when it is not dropped


def test_the_reference_branch_with_the_targets_own_tokens_is_plain_self_attention(tiny_sd15):
    """RSA over [own tokens; a copy of them] with ref_scale 1 is plain self-attention: with the untrained reference
    UNet (= the base UNet) reading the target itself with the target's prompt, the step's prediction equals the base
    UNet's, and differs as soon as the reference is another latent."""
    step, _, _ = T.build_step(tiny_sd15, T.BootPIGConfig(ref_scale=1.0), 64)
    b = batch()
    bm = introspect.base_model(tiny_sd15)
    ms = bm.model_sampling
    x = fp.noisy(ms, b["sigma"], b["x0"], b["noise"])
    conds = step.conds(b["context"], None, "cpu")
    with torch.no_grad():
        own = step.predict(x, x, b["sigma"], conds, conds)
        other = step.predict(x, fp.noisy(ms, b["sigma"], b["r0"], b["ref_noise"]), b["sigma"], conds, conds)
        plain = step.predict(x, None, b["sigma"], conds, None)
    tol = 1e-4 * (1 + plain.abs().max().item())
    assert (own - plain).abs().max().item() < tol
    assert (other - plain).abs().max().item() > 100 * tol


def test_trained_weights_round_trip_through_the_loader_and_reproduce_the_trainers_model(tiny_sd15, tmp_path):
    """Train a step, save the pack's BootPIG file, load it with the BootPIG Loader, encode the reference for the RSA
    Patch and sample one Euler step in ComfyUI: the denoised latent equals the trainer's in-memory prediction."""
    import comfy.sample
    import comfy.samplers
    import folder_paths
    from helpers import run_node

    from personalize import bootpig_nodes as B
    from personalize.nodes import reference_attention as R
    from personalize.nodes.forward_process import seeded_noise

    cfg = T.BootPIGConfig(steps=2, reference_unet_lr=1e-3, rsa_lr=1e-3, warmup_steps=0, checkpoint_every=0)
    step, ref_p, rsa_p = T.build_step(tiny_sd15, cfg, 64)
    engine.run(FixedBatch(step, T.BootPIGTrainer(step, ref_p, rsa_p, cfg, None, None).groups, batch()),
               T.engine_config(cfg), "cpu", progress=False)
    ref_sd, attn1_sd = T.trained_weights(step)
    folder = tmp_path / "bootpig"
    bootpig_weights.save(str(folder / "trained.safetensors"), ref_sd, attn1_sd, "sd15", {"x": "1"}, "fp32")
    folder_paths.add_model_folder_path("bootpig", str(folder))
    base, refm = run_node(B.BootPIGLoader, model=tiny_sd15, bootpig_name="trained.safetensors")

    g = torch.Generator().manual_seed(5)
    r0 = torch.randn(1, 4, 8, 8, generator=g)
    ref_ctx = torch.randn(1, 77, 768, generator=g)
    ctx = torch.randn(1, 77, 768, generator=g)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    sigma = 2.0
    reference = R.ReferenceSet(latents=r0, white=torch.zeros(4), encoder=refm, family="sd15", context=ref_ctx, seed=11)
    patched = run_node(B.BootPIGRSAPatch, model=base, reference=reference, ref_scale=cfg.ref_scale)[0]
    sigmas = torch.tensor([sigma, 0.0])
    got = comfy.sample.sample_custom(patched, noise, 1.0, comfy.samplers.sampler_object("euler"), sigmas,
                                     [[ctx, {}]], [[torch.zeros_like(ctx), {}]], torch.zeros(1, 4, 8, 8), seed=0)

    ms = introspect.base_model(tiny_sd15).model_sampling
    s = torch.tensor([sigma])
    x = fp.noisy(ms, s, torch.zeros(1, 4, 8, 8), noise)
    r_noisy = fp.noisy(ms, s, r0, seeded_noise((1, 4, 8, 8), 11, sigma, "cpu", torch.float32))
    with torch.no_grad():
        eps = step.predict(x, r_noisy, s, step.conds(ctx, None, "cpu"), step.conds(ref_ctx, None, "cpu"))
        bm = introspect.base_model(tiny_sd15)   # the sampler returns latents in the VAE's space
        want = bm.process_latent_out(ms.calculate_denoised(s, eps, x))
        untrained, _, _ = T.build_step(tiny_sd15, cfg, 64)
        before = bm.process_latent_out(ms.calculate_denoised(s, untrained.predict(
            x, r_noisy, s, untrained.conds(ctx, None, "cpu"), untrained.conds(ref_ctx, None, "cpu")), x))
    tol = 1e-4 * (1 + want.abs().max().item())
    assert (got - want).abs().max().item() < tol
    assert (got - before).abs().max().item() > 100 * tol    # training moved it: the comparison can fail


# ------------------------------------------------------------------------------------------ the whole trainer
def hand_made_dataset(folder, n=3, size=64, seed=0):
    """A dataset folder as a user would make it by hand: targets, references on white, captions; no masks."""
    import numpy as np
    from PIL import Image

    items = folder / "items"
    items.mkdir(parents=True)
    g = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray((g.random((size, size, 3)) * 255).astype(np.uint8)).save(items / f"{i:05d}.target.png")
        ref = np.full((40, 32, 3), 255, np.uint8)
        ref[8:32, 6:26] = (g.random((24, 20, 3)) * 200).astype(np.uint8)
        Image.fromarray(ref).save(items / f"{i:05d}.reference.png")
        (items / f"{i:05d}.txt").write_text(f"a photo of a thing{i}, on a table in the kitchen")
    return str(folder)


@pytest.fixture(scope="module")
def mods():
    return models.build_model("sd15", tiny=True, seed=0), models.build_clip(seed=0), models.build_vae(seed=0)


def test_killed_and_cancelled_runs_resume_to_the_same_weights(mods, tmp_path):
    import os

    import comfy.model_management as mm

    m, c, v = mods
    data = hand_made_dataset(tmp_path / "data")
    conf = T.BootPIGConfig(steps=5, batch_size=2, checkpoint_every=2, warmup_steps=2, reference_unet_lr=1e-3,
                           rsa_lr=1e-3, save_dtype="fp32")
    with torch.inference_mode():
        full = T.train(m, c, v, data, conf, str(tmp_path / "full.safetensors"))
    assert full.items == 3 and len(full.losses) == 5

    class Killed(Exception):
        pass

    def kill(step, total, loss):
        if step == 3:
            raise Killed()

    def cancel(step, total, loss):
        if step == 3:
            mm.interrupt_current_processing(True)

    for name, hook, exc, resumed_from in (("killed", kill, Killed, 2),
                                          ("cancelled", cancel, mm.InterruptProcessingException, 3)):
        path = str(tmp_path / f"{name}.safetensors")
        with torch.inference_mode(), pytest.raises(exc):
            T.train(m, c, v, data, conf, path, on_step=hook,
                    check_interrupt=mm.throw_exception_if_processing_interrupted)
        mm.interrupt_current_processing(False)
        assert not os.path.exists(path) and os.path.isfile(engine.checkpoint_path(path))
        with torch.inference_mode():
            resumed = T.train(m, c, v, data, conf, path)
        assert resumed.resumed_from == resumed_from, name
        assert resumed.losses == full.losses, name
        for k, a in full.reference_unet.items():
            assert torch.equal(a, resumed.reference_unet[k]), (name, k)
        for k, a in full.base_attn1.items():
            assert torch.equal(a, resumed.base_attn1[k]), (name, k)
    # the file loads with the Loader's reader and matches what the trainer returned
    ref, attn1, fam = bootpig_weights.load(str(tmp_path / "full.safetensors"), m)
    assert fam == "sd15" and all(torch.equal(ref[k], full.reference_unet[k]) for k in ref)


def test_trainer_node_saves_into_models_bootpig_and_returns_models(mods, tmp_path):
    import folder_paths
    from helpers import run_node

    from personalize import bootpig_nodes as B
    from personalize.nodes.errors import InputError

    m, c, v = mods
    data = hand_made_dataset(tmp_path / "data", n=2)
    folder_paths.add_model_folder_path("bootpig", str(tmp_path / "models_bootpig"), is_default=True)
    base, refm, name, curve = run_node(B.BootPIGTrainerNode, model=m, clip=c, vae=v, dataset=data, steps=2,
                                       batch_size=1, save_name="node_trained", checkpoint_every=0)
    assert name == "node_trained.safetensors" and (tmp_path / "models_bootpig" / name).is_file()
    assert curve.ndim == 4 and curve.shape[-1] == 3
    assert base.model is m.model and refm.model is not m.model
    assert len(base.patches) == len([k for k in m.model.diffusion_model.state_dict() if ".attn1." in k])
    with pytest.raises(InputError, match="'dataset'"):
        run_node(B.BootPIGTrainerNode, model=m, clip=c, vae=v, dataset=str(tmp_path / "nowhere"), steps=1,
                 save_name="x")
    with pytest.raises(InputError, match="'train'"):
        run_node(B.BootPIGTrainerNode, model=m, clip=c, vae=v, dataset=data, steps=1, save_name="y", train="all")


def test_augment_reference_is_deterministic_and_keeps_white_background():
    from personalize.nodes.bootpig_data import augment_reference, foreground_box

    ref = torch.ones(40, 30, 3)
    ref[10:30, 5:25] = torch.tensor([0.8, 0.1, 0.1])
    outs = [augment_reference(ref, torch.Generator().manual_seed(s), 64) for s in (1, 1, 2, 3, 4, 5, 6, 7)]
    assert torch.equal(outs[0], outs[1]) and not all(torch.equal(outs[0], o) for o in outs[2:])
    for o in outs:
        assert o.shape == (64, 64, 3)
        t, b, l, r = foreground_box(o)
        assert (b - t == 64) or (r - l == 64)          # the foreground fills the canvas along one side
        fg = (o < 0.96).any(-1)
        assert bool((o[~fg] >= 0.96).all())             # everything else is white (erasing fills white too)


def test_torchrun_two_processes_match_one_process_with_accumulation(mods, tmp_path):
    """2 processes x batch 1 (gloo, ``python -m scripts.train_bootpig`` under torchrun) against 1 process with 2
    accumulated micro-batches of 1: the same rows (reference dropout drawn once per global batch, caption dropout and
    augmentations per global row), gradients averaged the same way - equal to float32 rounding."""
    import subprocess
    import sys

    from test_dreambooth import REPO, subprocess_env

    from personalize.nodes.weights_io import load

    m, c, v = mods   # --random-tiny 0 builds the same three models
    data = hand_made_dataset(tmp_path / "data", n=3)
    common = dict(steps=2, reference_unet_lr=1e-3, rsa_lr=1e-3, warmup_steps=0, checkpoint_every=0,
                  save_dtype="fp32", caption_dropout=0.5, reference_dropout=0.0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "scripts.train_bootpig", "--random-tiny", "0", "--dataset", data, "--output-dir", str(tmp_path / "ddp"),
           "--save-name", "ddp", "--batch-size", "1", "--cpu"]
    for k, val in common.items():
        cmd += ["--" + k.replace("_", "-"), str(val)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the child processes (OMP_NUM_THREADS=1): CPU kernels round by thread count
    try:
        with torch.inference_mode():
            acc = T.train(m, c, v, data, T.BootPIGConfig(batch_size=1, grad_accumulation=2, **common),
                          str(tmp_path / "acc.safetensors"))
    finally:
        torch.set_num_threads(threads)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert out.strip().endswith("ddp.safetensors")
    ddp, meta = load(str(tmp_path / "ddp" / "ddp.safetensors"))
    assert meta["personalize.global_batch"] == "2"
    base = {k: val for k, val in m.model.diffusion_model.state_dict().items()}
    mine = {**{"ref_unet." + k: val for k, val in acc.reference_unet.items()},
            **{"base_attn1." + k: val for k, val in acc.base_attn1.items()}}
    assert set(ddp) == set(mine)
    moved = max(float((mine["base_attn1." + k] - base[k]).abs().max()) for k in acc.base_attn1)
    diff = max(float((ddp[k] - mine[k]).abs().max()) for k in mine)
    assert moved > 1e-4 and diff <= 1e-6, (diff, moved)
