"""All four techniques in one graph, on tiny SD1.5 and SDXL with CFG and a batch of 2:

DreamBooth LoRA (stock LoraLoader) -> Subject-Diffusion Expand + Location Mask Concat + Adapter -> BootPIG RSA Patch
-> Pick-and-Draw Appearance + Layout guidance -> KSampler.

It runs; every patch sees the rows it should (asserted from inside the patches, next to a stock-style IPAdapter-like
attn2 patch that splits rows by cond_or_uncond); no patch of the pack syncs with the device or copies from the host on
its per-block and per-call paths (tests/syncguard.py); setting any one technique to strength 0 gives the output of the
graph without that node.
"""
from __future__ import annotations

import collections
import json

import pytest
import torch
from helpers import run_api, run_node

import syncguard
from personalize import bootpig_nodes as B
from personalize import pick_and_draw_nodes as P
from personalize import subject_diffusion_nodes as SD
from personalize.nodes import adapters as ad
from personalize.nodes import pick_and_draw as G
from personalize.nodes import location as loc
from personalize.nodes import reference_attention as RA
from personalize.nodes import rows
from scripts import models

FAMILIES = ["sd15", "sdxl"]
PROMPT = "a photo of a sks dog on the beach"
BOX = "8, 8, 32, 40"
LORA = "compose_sks_dog.safetensors"
TINY_VISION = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": 32, "image_size": 224,
               "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-5,
               "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3,
               "num_hidden_layers": 2, "patch_size": 56, "projection_dim": 24, "torch_dtype": "float32"}
TECHNIQUES = ("lora", "adapter", "rsa", "appearance", "layout")


def sdxl_clip(seed=0):
    """A real SDXL comfy.sd.CLIP (CLIP-L + CLIP-G layouts, bundled tokenizers), 3 layers each, seeded random."""
    import comfy.sd
    import comfy.sdxl_clip
    from comfy.supported_models_base import ClipTarget

    small = {"num_hidden_layers": 3, "intermediate_size": 256, "num_attention_heads": 4}
    clip = comfy.sd.CLIP(target=ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel),
                         model_options={"clip_l_model_config": dict(small), "clip_g_model_config": dict(small)})
    models.init_random_(clip.cond_stage_model, seed)
    return clip


def save_lora(model, path, seed=0):
    """A DreamBooth-style LoRA file for ``model`` in the format the pack's trainer writes (kohya keys, attention
    layers, rank 4) with small random up-weights - what the stock LoraLoader reads. Training one is covered by
    tests/test_dreambooth.py; here only the file matters."""
    from personalize.nodes import lora
    from personalize.nodes.weights_io import save_atomic

    unet = model.model.diffusion_model
    names = lora.unet_target_names(unet, model.model.model_config.unet_config, "attention")
    with torch.inference_mode(False):
        mods = lora.inject(lora.trainable_copy(unet), names, 4, 4.0, seed=seed)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for m in mods.values():
                m.lora_up.copy_(torch.randn(m.lora_up.shape, generator=g) * 0.05)
        save_atomic(lora.state_dict(mods), str(path))
    return len(names)


@pytest.fixture(scope="module")
def kit(tmp_path_factory, tiny_sd15, tiny_sdxl):
    import comfy.clip_vision
    import folder_paths

    loras = tmp_path_factory.mktemp("loras")
    cfg = tmp_path_factory.mktemp("clipvision") / "config.json"
    cfg.write_text(json.dumps(TINY_VISION))
    cv = comfy.clip_vision.ClipVisionModel(str(cfg))
    models.init_random_(cv.model, seed=3)
    g = torch.Generator().manual_seed(11)
    image = torch.rand(1, 64, 64, 3, generator=g)
    mask = torch.zeros(1, 64, 64)
    mask[:, 12:52, 16:48] = 1.0
    old = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(loras)], {".safetensors"})
    folder_paths.filename_list_cache.pop("loras", None)
    out = {"clip_vision": cv, "image": image, "mask": mask, "vae": models.build_vae(seed=3), "fam": {}}
    for fam, base in (("sd15", tiny_sd15), ("sdxl", tiny_sdxl)):
        lora_path = loras / f"{fam}_{LORA}"
        assert save_lora(base, lora_path) > 0
        out["fam"][fam] = {"base": base, "lora": lora_path.name}
    yield out
    folder_paths.folder_names_and_paths["loras"] = old
    folder_paths.filename_list_cache.pop("loras", None)


_CLIPS: dict = {}


def family_clip(fam):
    if fam not in _CLIPS:
        _CLIPS[fam] = models.build_clip(seed=0) if fam == "sd15" else sdxl_clip(seed=0)
    return _CLIPS[fam]


def opened_weights(model, cv):
    """Subject-Diffusion parts with the adapter gates opened (a trained stand-in: zero-init gates change nothing)."""
    width, tokens, embed = ad.vision_dims(cv)
    with torch.inference_mode(False):
        w = ad.init_weights(model, width, tokens, embed, hidden=64, seed=0)
        with torch.no_grad():
            for a in w.modules.adapters:
                a.alpha_attn.fill_(0.7)
                a.alpha_dense.fill_(0.7)
    return w


def trained_location(expanded):
    """The Expand node's model with a non-zero location-channel weight (a trained stand-in)."""
    conv = expanded.get_model_object(loc.CONV_IN)
    w = conv.weight.detach().clone()
    g = torch.Generator().manual_seed(5)
    w[:, -1] = torch.randn(w[:, -1].shape, generator=g) * 0.3
    return loc.expand_model(expanded, weight=w, bias=conv.bias, replace=True)


def build(fam, kit, omit=(), zero=None):
    """The four-technique graph as ComfyUI would run it (node by node); ``omit``: nodes left out, ``zero``: the one
    technique set to strength/weight 0. Returns (model, positive, negative)."""
    import nodes

    f = kit["fam"][fam]
    clip = family_clip(fam)
    strength = {t: (0.0 if t == zero else 1.0) for t in TECHNIQUES}
    with torch.inference_mode():
        pos = nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
        neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    m = f["base"]
    if "lora" not in omit:
        m, clip = run_node(nodes.LoraLoader, model=m, clip=clip, lora_name=f["lora"],
                           strength_model=strength["lora"], strength_clip=strength["lora"])
    m = trained_location(run_node(SD.ExpandInputChannels, model=m)[0])
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    m = run_node(SD.LocationMaskConcat, model=m, latent=latent, boxes=BOX, uncond_mask="zero")[0]
    if "adapter" not in omit:
        m = run_node(SD.SubjectAdapter, model=m, weights=opened_weights(m, kit["clip_vision"]),
                     clip_vision=kit["clip_vision"], image=kit["image"], mask=kit["mask"], boxes=BOX, latent=latent,
                     strength=strength["adapter"])[0]
    if "rsa" not in omit:
        ref = run_node(B.BootPIGReferenceEncoder, model=m, vae=kit["vae"], images=kit["image"], mask=kit["mask"],
                       resolution=64)[0]
        m = run_node(B.BootPIGRSAPatch, model=m, reference=ref, strength=strength["rsa"])[0]
        assert strength["rsa"] == 0.0 or RA.find_rsa(m).settings.batched
    pd_ref = run_node(P.PickAndDrawReference, model=m, vae=kit["vae"], image=kit["image"], mask=kit["mask"],
                      resolution=64)[0]
    if "appearance" not in omit:
        m = run_node(P.AppearancePickingGuidance, model=m, reference=pd_ref, clip=clip, prompt=PROMPT,
                     subject_word="sks", weight=strength["appearance"], start_percent=0.0, end_percent=0.5,
                     iterations=1, step_size=0.5, layers="input.4", reference_noise="renoise")[0]
    if "layout" not in omit:
        m = run_node(P.LayoutDrawingGuidance, model=m, clip=clip, prompt=PROMPT, subject_word="sks",
                     class_word="dog", weight=strength["layout"], start_percent=0.0, end_percent=0.5,
                     step_size=0.5, layers="input.4")[0]
    return m, pos, neg


def run(model, pos, neg, steps=2, cfg=5.0, seed=1, device_tensors=False):
    """CFGGuider + euler, batch 2 (what KSampler runs); ``device_tensors``: noise, latent and sigmas marked as
    accelerator tensors for the sync guard."""
    import comfy.sample
    import comfy.samplers

    latent = torch.zeros(2, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps).cpu()
    if device_tensors:
        noise, latent, sigmas = (syncguard.as_device(t) for t in (noise, latent, sigmas))
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(pos, neg)
    guider.set_cfg(cfg)
    with torch.inference_mode():
        out = guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=seed,
                            disable_pbar=True)
    return out.as_subclass(torch.Tensor).clone()


# --------------------------------------------------------------------------------------------- row spies
SEEN = collections.defaultdict(collections.Counter)   # patch -> Counter of (cond_or_uncond, reference chunks, rows)


def _check_contract(where, eo, n):
    cou = rows.chunk_kinds(eo)
    assert n % len(cou) == 0, f"{where}: {n} rows, cond_or_uncond {cou}"
    ref = rows.reference_chunks(eo)
    assert all(k == 0 for k in cou[len(cou) - ref:]), f"{where}: reference chunks must be conditional: {cou}"
    assert len(eo.get("uuids") or cou) == len(cou), f"{where}: uuids {eo.get('uuids')} vs {cou}"
    roles = rows.row_roles(eo, n)
    SEEN[where][(tuple(cou), ref, n, "".join(r[0] for r in roles))] += 1
    return roles


def install_spies(monkeypatch, ip_patch_seen):
    orig_call, orig_gated = RA.RSAPatch.__call__, ad.gated
    orig_loc, orig_rec = loc.LocationConcat.__call__, G.AttnRecorder.__call__

    def rsa_call(self, n, context, value, eo):
        roles = _check_contract("BootPIG RSA (attn1_patch)", eo, n.shape[0])
        state = eo.get(self.state_key)
        if state is not None and not state.none_ref:
            want = [r == rows.POSITIVE for r in roles]
            assert state.uses_ref.tolist() == want, (roles, state.uses_ref.tolist())
        return orig_call(self, n, context, value, eo)

    def gated(adapter, x, objs, scale=1.0):
        eo = _current.get("adapter")
        roles = _check_contract("Subject-Diffusion adapter (middle_patch)", eo, x.shape[0])
        patch = _current["adapter_patch"]
        o, nul = patch.tokens(objs.device, objs.dtype)
        for r, role in enumerate(roles):   # negative-prompt rows get the null objects, every other row the subject
            assert torch.equal(objs[r], (nul if role == rows.NEGATIVE else o)[0]), (r, role)
        return orig_gated(adapter, x, objs, scale)

    orig_adapter = ad.AdapterPatch.__call__

    def adapter_call(self, x, eo):
        _current["adapter"], _current["adapter_patch"] = eo, self
        return orig_adapter(self, x, eo)

    def loc_call(self, executor, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kw):
        roles = _check_contract("Location Mask Concat (diffusion_model wrapper)", transformer_options, x.shape[0])

        def check(x5, *a, **k):
            want = self._map(x5.shape[-2], x5.shape[-1], x5.device, x5.dtype)[0, 0]
            for r, role in enumerate(roles):
                assert torch.equal(x5[r, -1], torch.zeros_like(want) if role == rows.NEGATIVE else want), (r, role)
            return executor(x5, *a, **k)

        check.class_obj = getattr(executor, "class_obj", None)
        return orig_loc(self, check, x, timesteps, context, y, control, transformer_options, **kw)

    def rec_call(self, n, context, value, eo):
        rec = eo.get(G.REC_KEY)
        if rec is not None:
            roles = _check_contract("Pick-and-Draw recorder (attn2_patch)", eo, n.shape[0])
            assert rec.rows == rows.generated_rows(eo, n.shape[0])           # it records the generated rows only
            assert set(roles[:rec.rows]) == {rows.POSITIVE}
        return orig_rec(self, n, context, value, eo)

    _current: dict = {}
    monkeypatch.setattr(RA.RSAPatch, "__call__", rsa_call)
    monkeypatch.setattr(ad, "gated", gated)
    monkeypatch.setattr(ad.AdapterPatch, "__call__", adapter_call)
    monkeypatch.setattr(loc.LocationConcat, "__call__", loc_call)
    monkeypatch.setattr(G.AttnRecorder, "__call__", rec_call)


def ip_adapter_like(seen):
    """A stock-style attn2 replace as IPAdapter_plus writes it: per-chunk image tokens chosen by cond_or_uncond,
    ``batch_prompt = b // len(cond_or_uncond)``."""
    from comfy.ldm.modules.attention import optimized_attention

    tokens: dict = {}

    def patch(q, k, v, eo):
        cou = eo["cond_or_uncond"]
        b = q.shape[0]
        batch_prompt = b // len(cou)
        width = q.shape[-1]
        if width not in tokens:
            g = torch.Generator().manual_seed(width)
            tokens[width] = (torch.randn(1, 4, width, generator=g), torch.randn(1, 4, width, generator=g))
        cond, uncond = (t.to(q.dtype) for t in tokens[width])
        ip = torch.cat([(cond.repeat(batch_prompt, 1, 1), uncond.repeat(batch_prompt, 1, 1))[i] for i in cou])
        assert ip.shape[0] == b, f"IPAdapter-like patch: {ip.shape[0]} image-token rows for {b} rows ({cou})"
        seen[(tuple(cou), b)] += 1
        out = optimized_attention(q, k, v, eo["n_heads"])
        return out + 0.3 * optimized_attention(q, ip, ip, eo["n_heads"])
    return patch


def with_stock_patch(model, seen):
    from personalize.nodes.introspect import transformer_blocks

    m = model.clone()
    p = ip_adapter_like(seen)
    for key in transformer_blocks(m):
        m.set_model_attn2_replace(p, key.name, key.id, key.index)
    return m


# ----------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("family", FAMILIES)
def test_four_techniques_run_with_consistent_rows_and_no_syncs(family, kit, monkeypatch, capsys):
    SEEN.clear()
    ip_seen: collections.Counter = collections.Counter()
    install_spies(monkeypatch, ip_seen)
    for cls, name, at in ((RA.RSAPatch, "__call__", None), (RA.RSAPatch, "replace", None),
                          (RA.RSAPatch, "apply_model", 1), (ad.AdapterPatch, "__call__", None),
                          (loc.LocationConcat, "__call__", 1), (G.AttnRecorder, "__call__", None)):
        monkeypatch.setattr(cls, name, syncguard.guarded(getattr(cls, name), f"{cls.__name__}.{name}", at))
    model, pos, neg = build(family, kit)
    model = with_stock_patch(model, ip_seen)
    with syncguard.active():
        out = run(model, pos, neg, device_tensors=True)
        guarded_ran = set(syncguard.SEEN)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert guarded_ran >= {"RSAPatch.__call__", "RSAPatch.replace", "RSAPatch.apply_model", "AdapterPatch.__call__",
                           "LocationConcat.__call__", "AttnRecorder.__call__"}
    assert G.LAST_RUN_LOG and G.LAST_RUN_LOG[0]["rows"] == 2       # one guided step on both generated rows
    for where in ("BootPIG RSA (attn1_patch)", "Subject-Diffusion adapter (middle_patch)",
                  "Location Mask Concat (diffusion_model wrapper)", "Pick-and-Draw recorder (attn2_patch)"):
        assert SEEN[where], f"{where} never ran"
    # CFG batch 2: the sampler's call has chunks [negative, positive] (ComfyUI's order) + one reference chunk of 2
    # rows (1 reference + 1 padding row)
    main = ((1, 0, 0), 1, 6, "nnpprr")
    assert main in SEEN["BootPIG RSA (attn1_patch)"] and main in SEEN["Location Mask Concat (diffusion_model wrapper)"]
    assert ((0, 0), 1, 4, "pprr") in SEEN["Pick-and-Draw recorder (attn2_patch)"]   # the guided forward
    assert ((1, 0, 0), 6) in ip_seen
    with capsys.disabled():
        print(f"\n[{family}] rows each patch saw: (cond_or_uncond, reference chunks, rows, roles) x calls")
        for where, c in SEEN.items():
            print(f"  {where}: " + "; ".join(f"{k[0]} ref={k[1]} rows={k[2]} {k[3]} x{v}" for k, v in sorted(c.items())))
        print("  IPAdapter-like attn2 replace: " + "; ".join(f"{k[0]} rows={k[1]} x{v}" for k, v in
                                                             sorted(ip_seen.items())))


@pytest.mark.parametrize("family", FAMILIES)
def test_any_technique_at_strength_zero_equals_the_graph_without_it(family, kit):
    """One step (inside every technique's range); Pick-and-Draw reads input block 4 (a 4x4 token grid in both
    families; the guided forward stops there) to keep the 10 samplings of tiny SDXL affordable on a CPU."""
    full = run(*build(family, kit), steps=1)
    for t in TECHNIQUES:
        without = run(*build(family, kit, omit=(t,)), steps=1)
        assert not torch.equal(without, full), f"{t} has no effect in the graph: the test would prove nothing"
        if t == "lora":   # the stock LoraLoader at strength 0 hands back its inputs: the graph IS the one without
            f = kit["fam"][family]
            m, c = run_node(__import__("nodes").LoraLoader, model=f["base"], clip=family_clip(family),
                            lora_name=f["lora"], strength_model=0.0, strength_clip=0.0)
            assert m is f["base"] and c is family_clip(family)
            continue
        zero = run(*build(family, kit, zero=t), steps=1)
        assert torch.equal(zero, without), t


# ------------------------------------------------------------------------------------------- the example workflow
def test_the_four_technique_example_workflow_runs_on_the_toy_model(kit):
    """example_workflows/toyworld_four_techniques.json, converted like the CLI converts it and run node by node on the
    toy model (4 steps). Two files it names are not on a test machine: the LoRA is written here, under the
    workflow's name, in the format the DreamBooth trainer saves (kohya keys) and read by the stock LoraLoader as in
    the workflow - training one would cost minutes and is tests/test_dreambooth.py's job; and there is no ViT-H/14,
    so CLIPVisionLoader's output is the tiny CLIP vision model (the node itself is stock ComfyUI)."""
    from pathlib import Path

    import folder_paths
    import nodes as core

    import personalize
    from personalize.toyworld import model as tw_model
    from scripts import workflow as wf

    ui = json.loads((Path(__file__).resolve().parents[1] / "example_workflows" /
                     "toyworld_four_techniques.json").read_text())
    classes = {**core.NODE_CLASS_MAPPINGS, **personalize.NODE_CLASS_MAPPINGS}
    info = {}
    for n in ui["nodes"]:
        if n["type"] in classes:
            it = classes[n["type"]].INPUT_TYPES()
            info[n["type"]] = {"input": it, "input_order": {k: list(v) for k, v in it.items()}}
    api = wf.ui_to_api(ui, info)
    types = {n["class_type"] for n in api.values()}
    assert {"LoraLoader", "PersonalizeSubjectDiffusionExpandInputChannels", "PersonalizeSubjectDiffusionAdapter",
            "PersonalizeSubjectDiffusionLocationMaskConcat", "PersonalizeBootPIGRSAPatch",
            "PersonalizeAppearancePickingGuidance", "PersonalizeLayoutDrawingGuidance", "KSampler"} <= types
    trained = tw_model.weights_present()
    lora_name = next(n["inputs"]["lora_name"] for n in api.values() if n["class_type"] == "LoraLoader")
    loras = folder_paths.get_folder_paths("loras")[0]
    toy = tw_model.load() if trained else tw_model.load_random(seed=0)
    assert save_lora(toy[0], Path(loras) / lora_name) > 0
    folder_paths.filename_list_cache.pop("loras", None)

    def override(ct, args):
        if ct == "CLIPVisionLoader":
            return (kit["clip_vision"],)
        if ct == "KSampler":
            args["steps"] = 4
        if ct == "PersonalizeToyWorldLoader" and not trained:
            args["source"] = "random (untrained)"
        return None

    saved = run_api(api, classes, override)
    size = tw_model.shipped_image_size() if trained else tw_model.IMAGE_SIZE   # the workflow's latent: 128
    assert len(saved) == 1 and saved[0].shape == (2, size, size, 3) and torch.isfinite(saved[0]).all()
    assert G.LAST_RUN_LOG, "Pick-and-Draw guided no step"
