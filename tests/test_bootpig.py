"""BootPIG: Reference Self-Attention, pooling, the reference encoder, the loader - on tiny real-layout SD1.5 and SDXL
models sampled with ComfyUI's own KSampler path."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from helpers import run_node, sample

from personalize import bootpig_nodes as B
from personalize.nodes import attention as A
from personalize.nodes import bootpig_weights, introspect
from personalize.nodes import reference_attention as R
from personalize.nodes.errors import InputError
from scripts import models

FAMILIES = ["sd15", "sdxl"]


@pytest.fixture(scope="module")
def vae():
    return models.build_vae(seed=3)


@pytest.fixture(scope="module")
def refs():
    g = torch.Generator().manual_seed(7)
    return torch.rand(3, 40, 48, 3, generator=g)


def model_for(family, tiny_sd15, tiny_sdxl):
    return tiny_sd15 if family == "sd15" else tiny_sdxl


def conds(family):
    return models.random_conditioning(family, seed=1), models.random_conditioning(family, seed=2)


def encode(model, vae, images, **kw):
    return run_node(B.BootPIGReferenceEncoder, model=model, vae=vae, images=images, resolution=64, **kw)[0]


def rsa(model, reference, **kw):
    return run_node(B.BootPIGRSAPatch, model=model, reference=reference, **kw)[0]


# ------------------------------------------------------------------------------------------------ block structure
@pytest.mark.parametrize("family,count", [("sd15", 16), ("sdxl", 70)])
def test_every_attn1_block_gets_rsa(family, count, tiny_sd15, tiny_sdxl, vae, refs):
    m = model_for(family, tiny_sd15, tiny_sdxl)
    assert len(introspect.transformer_blocks(m)) == count
    p = rsa(m, encode(m, vae, refs[:1]), reference_features="once")
    replaced = p.model_options["transformer_options"]["patches_replace"]["attn1"]
    assert len(replaced) == count
    assert ("middle", 0, 0) in replaced
    # and every block really reads reference tokens: the feature bank of one call holds all of them
    patch = R.find_rsa(p)
    seen = {}
    orig = patch._bank

    def spy(*a, **k):
        bank = orig(*a, **k)
        seen.update(bank)
        return bank

    patch._bank = spy
    try:
        c, u = conds(family)
        sample(p, c, u, steps=1)
    finally:
        del patch._bank
    assert len(seen) == count and set(seen) == set(introspect.transformer_blocks(m))


# ---------------------------------------------------------------------------------------------------- RSA algebra
@pytest.mark.parametrize("family", FAMILIES)
def test_rsa_with_own_tokens_and_scale_1_equals_plain_self_attention(family, tiny_sd15, tiny_sdxl):
    """Duplicated keys/values give the same softmax: the whole transformer block, patched, equals the plain block
    computed in float64."""
    m = model_for(family, tiny_sd15, tiny_sdxl)
    key = introspect.transformer_blocks(m)[-1]
    block = introspect.attention_module(m, key, "attn1")
    tblock = next(b for b in _blocks(m, key))
    dim = block.to_q.weight.shape[1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, dim, generator=g)
    ctx = torch.randn(2, 5, models.context_dim(family), generator=g)
    reference = R.ReferenceSet(latents=torch.zeros(1, 4, 8, 8), white=torch.zeros(4), encoder=m, family=family)
    patch = R.RSAPatch(reference, R.RSASettings(ref_scale=1.0, pooling="softmax"), base_model=m)
    with torch.no_grad():
        n = tblock.norm1(x)
        state = R.CallState(patch.settings, 1, ref_index=torch.tensor([[2], [3]]), uses_ref=torch.tensor([True, True]),
                            all_ref=True, none_ref=False, bank={key: n.clone()})
        to = {"patches": {"attn1_patch": [patch]},
              "patches_replace": {"attn1": {(key.name, key.id, key.index): patch.replace}},
              "block": (key.name, key.id), "block_index": key.index, patch.state_key: state}
        out = tblock(x, context=ctx, transformer_options=to)
        ref64 = copy.deepcopy(tblock).double()(x.double(), context=ctx.double(), transformer_options={})
        state.bank = {key: 3.0 * n}  # other reference tokens: the patched block must then differ
        moved = tblock(x, context=ctx, transformer_options=to)
    tol = 1e-4 * (1 + ref64.abs().max().item())
    assert (out.double() - ref64).abs().max().item() < tol
    assert (moved.double() - ref64).abs().max().item() > 100 * tol


def _blocks(m, key):
    from comfy.ldm.modules.attention import SpatialTransformer

    unet = introspect.base_model(m).diffusion_model
    seq = {"input": lambda: unet.input_blocks[key.id], "middle": lambda: unet.middle_block,
           "output": lambda: unet.output_blocks[key.id]}[key.name]()
    for layer in seq:
        if isinstance(layer, SpatialTransformer):
            yield layer.transformer_blocks[key.index]


def test_rsa_replace_matches_formula_with_key_scaling_in_float64():
    """RSA(f, f_ref) = softmax(q(f) [k(f); k(s f_ref)]^T) [v(f); v(f_ref)], s on the keys only."""
    g = torch.Generator().manual_seed(1)
    heads, T, C = 2, 12, 16
    wq, wk, wv = (torch.randn(C, C, generator=g) / 4 for _ in range(3))
    f, fref = torch.randn(3, T, C, generator=g), torch.randn(3, T, C, generator=g)
    reference = R.ReferenceSet(latents=torch.zeros(1, 4, 2, 2), white=torch.zeros(4), encoder=None, family="sd15")
    patch = R.RSAPatch(reference, R.RSASettings(ref_scale=1.1))
    state = R.CallState(patch.settings, 1, ref_index=torch.tensor([[3], [4], [5]]), uses_ref=torch.ones(3, dtype=torch.bool),
                        all_ref=True, none_ref=False, bank={introspect.BlockKey("input", 1, 0): fref})
    eo = {"block": ("input", 1), "block_index": 0, "n_heads": heads, patch.state_key: state}
    n, ctx, val = patch(f, f, f, eo)
    out = patch.replace(f @ wq.T, ctx @ wk.T, val @ wv.T, eo)
    k = torch.cat([f, 1.1 * fref], 1).double() @ wk.T.double()
    v = torch.cat([f, fref], 1).double() @ wv.T.double()
    want = A.attention_reference(f.double() @ wq.T.double(), k, v, heads)
    assert (out.double() - want).abs().max().item() < 1e-5


def test_rows_without_reference_get_plain_self_attention():
    g = torch.Generator().manual_seed(2)
    heads, T, C = 2, 8, 8
    f, fref = torch.randn(2, T, C, generator=g), torch.randn(1, T, C, generator=g)
    reference = R.ReferenceSet(latents=torch.zeros(1, 4, 2, 2), white=torch.zeros(4), encoder=None, family="sd15")
    patch = R.RSAPatch(reference, R.RSASettings())
    state = R.CallState(patch.settings, 1, ref_index=torch.tensor([[2], [1]]), uses_ref=torch.tensor([True, False]),
                        all_ref=False, none_ref=False, bank={introspect.BlockKey("output", 3, 0): fref})
    eo = {"block": ("output", 3), "block_index": 0, "n_heads": heads, patch.state_key: state}
    _, ctx, val = patch(f, f, f, eo)
    out = patch.replace(f, ctx, val, eo)
    plain = A.attention_reference(f[1:], f[1:], f[1:], heads)
    assert (out[1:].double() - plain).abs().max().item() < 1e-5
    rsa_row = A.attention_reference(f[:1], torch.cat([f[:1], 1.1 * fref], 1), torch.cat([f[:1], fref], 1), heads)
    assert (out[:1].double() - rsa_row).abs().max().item() < 1e-5


# ------------------------------------------------------------------------------------------------------- pooling
def test_pooling_modes_match_their_formulas():
    g = torch.Generator().manual_seed(3)
    o = torch.randn(2, 6, 4, generator=g)
    outs = [torch.randn(2, 6, 4, generator=g) * (i + 1) for i in range(3)]
    deltas = [oi - o for oi in outs]
    # paper: per-pixel softmax over ||o_i - o||
    n = torch.stack([d.norm(dim=-1) for d in deltas])
    p = torch.exp(n) / torch.exp(n).sum(0)
    want = o + sum(p[i].unsqueeze(-1) * deltas[i] for i in range(3))
    assert torch.allclose(R.pool(o, deltas, "softmax"), want, atol=1e-5)
    # official code: per token, the delta with the largest norm
    j = n.argmax(0)
    want = torch.stack([torch.stack([outs[j[b, t]][b, t] for t in range(6)]) for b in range(2)])
    assert torch.allclose(R.pool(o, deltas, "argmax"), want, atol=1e-5)
    assert torch.allclose(R.pool(o, deltas, "mean"), torch.stack(outs).mean(0), atol=1e-5)


@pytest.mark.parametrize("mode", R.POOLING_MODES)
def test_concat_and_pooled_rsa_in_the_attention_replace(mode):
    """Through the replace: concat is one softmax over all references; the others pool per-reference RSA outputs."""
    g = torch.Generator().manual_seed(4)
    heads, T, C, N = 2, 6, 8, 3
    q = torch.randn(1, T, C, generator=g)
    k = torch.randn(1, T * (N + 1), C, generator=g)
    v = torch.randn(1, T * (N + 1), C, generator=g)
    reference = R.ReferenceSet(latents=torch.zeros(N, 4, 2, 2), white=torch.zeros(4), encoder=None, family="sd15")
    patch = R.RSAPatch(reference, R.RSASettings(pooling=mode))
    state = R.CallState(patch.settings, N, ref_index=torch.zeros(1, N, dtype=torch.long),
                        uses_ref=torch.tensor([True]), all_ref=True, none_ref=False)
    out = patch.replace(q, k, v, {"block": ("input", 1), "block_index": 0, "n_heads": heads, patch.state_key: state})
    if mode == "concat":
        want = A.attention_reference(q, k, v, heads)
    else:
        o = A.attention_reference(q, k[:, :T], v[:, :T], heads)
        oi = [A.attention_reference(q, torch.cat([k[:, :T], k[:, T * (i + 1):T * (i + 2)]], 1),
                                    torch.cat([v[:, :T], v[:, T * (i + 1):T * (i + 2)]], 1), heads) for i in range(N)]
        want = R.pool(o, [x - o for x in oi], mode)
    assert (out.double() - want.double()).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_one_reference_gives_the_same_result_in_every_pooling_mode(family, tiny_sd15, tiny_sdxl, vae, refs):
    m = model_for(family, tiny_sd15, tiny_sdxl)
    reference = encode(m, vae, refs[:1])
    c, u = conds(family)
    outs = [sample(rsa(m, reference, pooling=mode), c, u, steps=2) for mode in R.POOLING_MODES]
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


# -------------------------------------------------------------------------------------------- identity and leaks
@pytest.mark.parametrize("family", FAMILIES)
def test_strength_zero_and_empty_range_equal_the_unpatched_model(family, tiny_sd15, tiny_sdxl, vae, refs):
    m = model_for(family, tiny_sd15, tiny_sdxl)
    reference = encode(m, vae, refs[:2])
    c, u = conds(family)
    plain = sample(m, c, u, steps=2)
    assert torch.equal(sample(rsa(m, reference, strength=0.0), c, u, steps=2), plain)
    assert torch.equal(sample(rsa(m, reference, start_percent=0.0, end_percent=0.0), c, u, steps=2), plain)
    assert not torch.equal(sample(rsa(m, reference), c, u, steps=2), plain)


def test_a_step_outside_start_end_is_untouched(tiny_sd15, vae, refs):
    """One step at sigma_max: with start_percent 0.5 that step is outside the range, with 0.0 inside."""
    reference = encode(tiny_sd15, vae, refs[:1])
    c, u = conds("sd15")
    plain = sample(tiny_sd15, c, u, steps=1)
    assert torch.equal(sample(rsa(tiny_sd15, reference, start_percent=0.5), c, u, steps=1), plain)
    assert not torch.equal(sample(rsa(tiny_sd15, reference, start_percent=0.0), c, u, steps=1), plain)


@pytest.mark.parametrize("features", R.FEATURE_MODES)
def test_parent_unchanged_and_back_to_back_prompts_share_no_state(features, tiny_sd15, vae, refs):
    reference = encode(tiny_sd15, vae, refs[:2])
    c, u = conds("sd15")
    before = sample(tiny_sd15, c, u, steps=2)
    patched = rsa(tiny_sd15, reference, reference_features=features)
    first = sample(patched, c, u, steps=2)
    second = sample(patched, c, u, steps=2)
    other = sample(patched, *conds("sd15")[::-1], steps=2)
    third = sample(patched, c, u, steps=2)
    assert torch.equal(first, second) and torch.equal(first, third)
    assert not torch.equal(other, first)
    assert torch.equal(sample(tiny_sd15, c, u, steps=2), before)
    assert "attn1" not in tiny_sd15.model_options["transformer_options"].get("patches_replace", {})
    assert not tiny_sd15.wrappers


def test_batched_reference_rows_equal_a_separate_reference_unet_pass(tiny_sd15, vae, refs):
    """Reference-attention mode appends the reference rows to the base UNet call; a separately loaded copy of the same
    weights (trained-encoder path) must give the same images."""
    reference = encode(tiny_sd15, vae, refs[:2])
    c, u = conds("sd15")
    separate = models.build_model("sd15", tiny=True, seed=0)  # same seed as the fixture: the same weights, loaded twice
    assert separate.model is not tiny_sd15.model
    ref_sep = R.ReferenceSet(latents=reference.latents, white=reference.white, encoder=separate, family="sd15",
                             seed=reference.seed)
    p_batched = rsa(tiny_sd15, reference)
    p_sep = rsa(tiny_sd15, ref_sep)
    assert R.find_rsa(p_batched).settings.batched and not R.find_rsa(p_sep).settings.batched
    assert R.find_rsa(p_sep).models() == [separate]
    a, b = sample(p_batched, c, u, steps=2), sample(p_sep, c, u, steps=2)
    assert (a - b).abs().max().item() < 1e-3 * (1 + a.abs().max().item())


def test_three_branch_with_equal_scales_is_cfg(tiny_sd15, vae, refs):
    """eps_u + s (eps_ref - eps_u) + s (eps_ref+text - eps_ref) = eps_u + s (eps_ref+text - eps_u): plain CFG at s."""
    reference = encode(tiny_sd15, vae, refs[:1])
    c, u = conds("sd15")
    cfg = sample(rsa(tiny_sd15, reference), c, u, steps=2, cfg=4.0)
    tb = sample(rsa(tiny_sd15, reference, guidance="three_branch", image_scale=4.0, text_scale=4.0), c, u, steps=2, cfg=9.0)
    assert (cfg - tb).abs().max().item() < 1e-3 * (1 + cfg.abs().max().item())
    tb2 = sample(rsa(tiny_sd15, reference, guidance="three_branch"), c, u, steps=2)
    assert not torch.allclose(tb2, cfg)


def test_batch_of_two_latents_with_cfg(tiny_sdxl, vae, refs):
    reference = encode(tiny_sdxl, vae, refs[:2])
    c, u = conds("sdxl")
    out = sample(rsa(tiny_sdxl, reference, pooling="argmax"), c, u, steps=2, batch=2, size=(8, 12))
    assert out.shape == (2, 4, 8, 12) and torch.isfinite(out).all()


def test_reference_prompt_is_used_for_the_reference_pass(tiny_sd15, vae, refs):
    c, u = conds("sd15")
    own = encode(tiny_sd15, vae, refs[:1])
    fixed = encode(tiny_sd15, vae, refs[:1], reference_conditioning=models.random_conditioning("sd15", seed=9))
    assert fixed.context is not None and fixed.context.shape == (1, 77, 768)
    assert not torch.equal(sample(rsa(tiny_sd15, own), c, u, steps=2), sample(rsa(tiny_sd15, fixed), c, u, steps=2))


# ------------------------------------------------------------------------------------------------------- encoder
def test_encoder_puts_subject_on_white_and_pads_square(tiny_sd15, vae):
    from personalize.nodes.images import subject_on_white

    img = torch.zeros(20, 40, 3)
    img[5:15, 10:20] = 0.25
    mask = torch.zeros(20, 40)
    mask[5:15, 10:20] = 1.0
    out = subject_on_white(img, mask, 16)
    assert out.shape == (16, 16, 3)
    assert torch.allclose(out[8, 8], torch.full((3,), 0.25), atol=0.02)  # cropped to the subject: it fills the square
    full = subject_on_white(img, None, 20)
    assert torch.allclose(full[0], torch.ones(20, 3), atol=1e-3)  # padded top rows are white


def test_bad_inputs_give_clear_errors_naming_the_input(tiny_sd15, tiny_sdxl, vae, refs):
    with pytest.raises(InputError, match="'images'.*at least one reference image"):
        encode(tiny_sd15, vae, refs[:0])
    with pytest.raises(InputError, match="'mask'.*image size 40x48"):
        encode(tiny_sd15, vae, refs[:2], mask=torch.ones(2, 32, 32))
    with pytest.raises(InputError, match="'mask'.*empty mask"):
        encode(tiny_sd15, vae, refs[:1], mask=torch.zeros(1, 40, 48))
    with pytest.raises(InputError, match="'images'.*one size.*mixed sizes"):
        encode(tiny_sd15, vae, [refs[:1], torch.rand(1, 32, 32, 3)])
    sdxl_ref = encode(tiny_sdxl, vae, refs[:1])
    with pytest.raises(InputError, match="'reference'.*SD1.5.*SDXL"):
        rsa(tiny_sd15, sdxl_ref)
    with pytest.raises(InputError, match="'reference_conditioning'.*width 768"):
        encode(tiny_sd15, vae, refs[:1], reference_conditioning=models.random_conditioning("sdxl"))
    reference = encode(tiny_sd15, vae, refs[:1])
    with pytest.raises(InputError, match="'model'.*already has one"):
        rsa(rsa(tiny_sd15, reference), reference)
    with pytest.raises(InputError, match="'start_percent'"):
        rsa(tiny_sd15, reference, start_percent=0.8, end_percent=0.2)


# -------------------------------------------------------------------------------------------------------- loader
def trained_like(model, seed=5):
    sd = introspect.base_model(model).diffusion_model.state_dict()
    g = torch.Generator().manual_seed(seed)
    ref = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in sd.items()}
    attn1 = {k: torch.randn(sd[k].shape, generator=g) * 0.01 for k in bootpig_weights.attn1_keys(sd)}
    return ref, attn1


def test_loader_round_trip_and_application(tiny_sd15, tmp_path):
    import folder_paths

    ref, attn1 = trained_like(tiny_sd15)
    path = str(tmp_path / "bootpig" / "mine.safetensors")
    bootpig_weights.save(path, ref, attn1, "sd15")
    assert not [f for f in os.listdir(tmp_path / "bootpig") if f.endswith(".partial")]
    ref2, attn2, fam = bootpig_weights.load(path, tiny_sd15)
    assert fam == "sd15" and ref2.keys() == ref.keys() and attn2.keys() == attn1.keys()
    assert all(torch.equal(ref[k], ref2[k]) for k in ref) and all(torch.equal(attn1[k], attn2[k]) for k in attn1)
    folder_paths.add_model_folder_path("bootpig", str(tmp_path / "bootpig"))
    assert "mine.safetensors" in B.BootPIGLoader.INPUT_TYPES()["required"]["bootpig_name"][0]
    base, refm = run_node(B.BootPIGLoader, model=tiny_sd15, bootpig_name="mine.safetensors")
    assert base.model is tiny_sd15.model and len(base.patches) == len(attn1)
    assert all(torch.equal(refm.model.diffusion_model.state_dict()[k], ref[k]) for k in ref)
    assert refm.model is not tiny_sd15.model
    # the loaded models run together: trained reference UNet in a separate pass
    vae = models.build_vae()
    reference = encode(refm, vae, torch.rand(1, 32, 32, 3))
    c, u = conds("sd15")
    p = rsa(base, reference)
    assert not R.find_rsa(p).settings.batched
    assert torch.isfinite(sample(p, c, u, steps=1)).all()
    assert torch.equal(sample(tiny_sd15, c, u, steps=1), sample(tiny_sd15, c, u, steps=1))


def test_loader_accepts_the_official_diffusers_layout(tiny_sd15, tmp_path):
    import comfy.utils
    from safetensors.torch import save_file

    ref, attn1 = trained_like(tiny_sd15, seed=6)
    cfg = introspect.base_model(tiny_sd15).model_config.unet_config
    to_ldm = comfy.utils.unet_to_diffusers(cfg)
    to_diff = {v: k for k, v in to_ldm.items()}
    full_base = dict(introspect.base_model(tiny_sd15).diffusion_model.state_dict())
    full_base.update(attn1)
    for sub, sd in (("ref_unet", ref), ("base_unet", full_base)):
        (tmp_path / "ckpt" / sub).mkdir(parents=True)
        save_file({to_diff[k]: v.contiguous() for k, v in sd.items()},
                  str(tmp_path / "ckpt" / sub / "diffusion_pytorch_model.safetensors"))
    ref2, attn2, fam = bootpig_weights.load(str(tmp_path / "ckpt"), tiny_sd15)
    assert fam == "sd15"
    assert all(torch.equal(ref[k], ref2[k]) for k in ref) and all(torch.equal(attn1[k], attn2[k]) for k in attn1)


def test_loader_refuses_other_family_and_incomplete_files(tiny_sd15, tmp_path):
    ref, attn1 = trained_like(tiny_sd15)
    p = str(tmp_path / "xl.safetensors")
    bootpig_weights.save(p, ref, attn1, "sdxl")
    with pytest.raises(InputError, match="'bootpig_name'.*SD1.5.*made for SDXL"):
        bootpig_weights.load(p, tiny_sd15)
    missing = sorted(attn1)[:2]
    p2 = str(tmp_path / "partial.safetensors")
    bootpig_weights.save(p2, ref, {k: v for k, v in attn1.items() if k not in missing}, "sd15")
    with pytest.raises(InputError, match="missing 2 keys: " + missing[0].replace(".", r"\.")):
        bootpig_weights.load(p2, tiny_sd15)
    from safetensors.torch import save_file

    p3 = str(tmp_path / "other.safetensors")
    save_file({"x": torch.zeros(1)}, p3)
    with pytest.raises(InputError, match="made by this pack"):
        bootpig_weights.load(p3, tiny_sd15)


# ------------------------------------------------------------------------------------- rows, guider, reference prompt
def _sample_with(guider, steps=2, seed=1, batch=1, size=(8, 8)):
    import comfy.sample
    import comfy.samplers

    latent = torch.zeros(batch, 4, *size)
    noise = comfy.sample.prepare_noise(latent, seed)
    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "normal",
                                             steps).cpu()
    with torch.inference_mode():
        return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=seed,
                             disable_pbar=True).clone()


def _cfg_guider(model, c, u, cfg):
    import comfy.samplers

    g = comfy.samplers.CFGGuider(model)
    g.set_conds(c, u)
    g.set_cfg(cfg)
    return g


def _spy_calls(model):
    """A clone whose APPLY_MODEL calls are recorded inside RSA's wrapper: (cond_or_uncond, reference chunks,
    c_crossattn, timesteps) per call."""
    import comfy.patcher_extension as pe

    from personalize.nodes import rows

    calls = []

    def spy(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kw):
        calls.append((list(transformer_options.get("cond_or_uncond") or []),
                      rows.reference_chunks(transformer_options), c_crossattn.detach().clone(), x.shape[0]))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)

    m = model.clone()
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test_spy_inner", spy)
    return m, calls


@pytest.mark.parametrize("batch,n_refs", [(1, 1), (2, 1), (2, 2), (3, 2)])
def test_batched_reference_rows_extend_cond_or_uncond_in_whole_chunks(tiny_sd15, vae, refs, batch, n_refs):
    """ComfyUI's contract: rows = len(cond_or_uncond) x chunk. Reference rows come after the sampler's chunks, padded
    to whole chunks of conditional (0) entries, with uuids, and counted in personalize.reference_chunks; a stock-style
    IPAdapter-like attn2 patch (image tokens per chunk by cond_or_uncond) runs next to them."""
    from comfy.ldm.modules.attention import optimized_attention

    reference = encode(tiny_sd15, vae, refs[:n_refs])
    c, u = conds("sd15")
    p, calls = _spy_calls(rsa(tiny_sd15, reference))
    seen = []

    def ip_like(q, k, v, eo):
        cou = eo["cond_or_uncond"]
        bp = q.shape[0] // len(cou)
        tok = torch.ones(1, 3, q.shape[-1], dtype=q.dtype)
        ip = torch.cat([(tok.repeat(bp, 1, 1), -tok.repeat(bp, 1, 1))[i] for i in cou])
        assert ip.shape[0] == q.shape[0] and len(eo["uuids"]) == len(cou)
        seen.append((tuple(cou), q.shape[0]))
        return optimized_attention(q, k, v, eo["n_heads"]) + 0.1 * optimized_attention(q, ip, ip, eo["n_heads"])

    for key in introspect.transformer_blocks(p):
        p.set_model_attn2_replace(ip_like, key.name, key.id, key.index)
    out = sample(p, c, u, steps=2, batch=batch)
    assert torch.isfinite(out).all()
    k = -(-n_refs // batch)                                   # reference chunks: n_refs rows padded to chunks
    for cou, ref_chunks, _, rows_ in calls:
        assert sorted(cou[:2]) == [0, 1] and cou[2:] == [0] * k and ref_chunks == k
        assert rows_ == batch * (2 + k)
    assert seen and all(n == batch * (2 + k) for _, n in seen)


def test_three_branch_guider_with_equal_scales_is_cfg_in_one_call(tiny_sd15, vae, refs):
    reference = encode(tiny_sd15, vae, refs[:1])
    c, u = conds("sd15")
    p = rsa(tiny_sd15, reference)
    cfg = _sample_with(_cfg_guider(p, c, u, 4.0))
    spied, calls = _spy_calls(p)
    (g,) = run_node(B.BootPIGThreeBranchGuider, model=spied, positive=c, negative=u, image_scale=4.0, text_scale=4.0)
    tb = _sample_with(g)
    assert (cfg - tb).abs().max().item() < 1e-3 * (1 + cfg.abs().max().item())
    assert len(calls) == 2                                    # one batched UNet call per step for the three branches
    for cou, ref_chunks, _, _ in calls:
        assert sorted(cou[:3]) == [0, 1, 2] and cou[3:] == [0] and ref_chunks == 1
    (g2,) = run_node(B.BootPIGThreeBranchGuider, model=p, positive=c, negative=u)
    assert not torch.allclose(_sample_with(g2), cfg)
    # the RSA node's own three_branch (one extra batch per step) computes the same guidance
    legacy = sample(rsa(tiny_sd15, reference, guidance="three_branch"), c, u, steps=2)
    assert (legacy - _sample_with(g2)).abs().max().item() < 1e-3 * (1 + legacy.abs().max().item())


@pytest.mark.parametrize("route", ["guider", "rsa_node"])
def test_three_branch_reference_rows_carry_the_reference_prompt(tiny_sd15, vae, refs, route):
    """Official pipeline: the reference is encoded once with reference_prompt (default: the prompt) and serves both
    reference branches - never the negative prompt."""
    c, u = conds("sd15")
    pos_ctx, neg_ctx = c[0][0], u[0][0]
    own_prompt = models.random_conditioning("sd15", seed=9)
    for reference, want in ((encode(tiny_sd15, vae, refs[:1]), pos_ctx),
                            (encode(tiny_sd15, vae, refs[:1], reference_conditioning=own_prompt), own_prompt[0][0])):
        if route == "guider":
            spied, calls = _spy_calls(rsa(tiny_sd15, reference))
            (g,) = run_node(B.BootPIGThreeBranchGuider, model=spied, positive=c, negative=u)
            _sample_with(g, steps=1)
        else:
            spied, calls = _spy_calls(rsa(tiny_sd15, reference, guidance="three_branch"))
            sample(spied, c, u, steps=1)
        with_ref = [(cou, ctx, n) for cou, k, ctx, n in calls if k]
        assert with_ref and all(1 in cou for cou, _, _ in with_ref)  # a negative-prompt chunk reads the reference
        for cou, ctx, n in with_ref:
            per = n // len(cou)
            ref_rows = ctx[(len(cou) - 1) * per:][:1]              # the reference row (the rest is padding)
            assert torch.equal(ref_rows[0], want[0].to(ref_rows.dtype))
            assert not torch.equal(ref_rows[0], neg_ctx[0].to(ref_rows.dtype))


def test_three_branch_guider_refuses_models_it_cannot_guide(tiny_sd15, vae, refs):
    c, u = conds("sd15")
    with pytest.raises(InputError, match="'model'.*BootPIG RSA Patch"):
        run_node(B.BootPIGThreeBranchGuider, model=tiny_sd15, positive=c, negative=u)
    reference = encode(tiny_sd15, vae, refs[:1])
    with pytest.raises(InputError, match="'model'.*guidance = cfg"):
        run_node(B.BootPIGThreeBranchGuider, model=rsa(tiny_sd15, reference, guidance="three_branch"), positive=c,
                 negative=u)
    with pytest.raises(InputError, match="'image_scale'.*finite"):
        run_node(B.BootPIGThreeBranchGuider, model=rsa(tiny_sd15, reference), positive=c, negative=u,
                 image_scale=float("nan"))


def test_the_sync_guard_catches_syncs_and_host_copies():
    """tests/syncguard.py can fail: a float(sigma), an .item() and a blocking host copy inside a guarded patch."""
    import syncguard

    sig = syncguard.as_device(torch.tensor([3.0]))
    host = torch.ones(2)

    def bad_float(s):
        return float(s[0])

    def bad_item(s):
        return (s * 2).max().item()

    def bad_copy(s):
        return host.to(s.device)

    def fine(s):
        return s * 2 + host.to(s.dtype)

    with syncguard.active():
        for fn in (bad_float, bad_item, bad_copy):
            with pytest.raises(syncguard.SyncError):
                syncguard.guarded(fn, fn.__name__)(sig)
        syncguard.guarded(fine, "fine")(sig)
        assert float(sig[0]) == 3.0          # outside a guarded scope: allowed


def test_reference_on_uncond_is_three_branch_guidance_with_image_scale_1(tiny_sd15, vae, refs):
    """eps_ref,u + s (eps_ref,c - eps_ref,u) = eps_u + 1 (eps_ref,u - eps_u) + s (eps_ref,c - eps_ref,u): CFG whose
    negative rows read the reference is three-branch guidance at image_scale 1 (one reference prompt for both)."""
    reference = encode(tiny_sd15, vae, refs[:1], reference_conditioning=models.random_conditioning("sd15", seed=9))
    c, u = conds("sd15")
    on = sample(rsa(tiny_sd15, reference, reference_on_uncond=True), c, u, steps=2, cfg=4.0)
    off = sample(rsa(tiny_sd15, reference), c, u, steps=2, cfg=4.0)
    tb = sample(rsa(tiny_sd15, reference, guidance="three_branch", image_scale=1.0, text_scale=4.0), c, u, steps=2)
    assert (on - tb).abs().max().item() < 1e-3 * (1 + on.abs().max().item())
    assert (on - off).abs().max().item() > 1e-2 * (1 + on.abs().max().item())
    # the parent model is untouched and the option is per patch
    assert torch.equal(sample(tiny_sd15, c, u, steps=2, cfg=4.0), sample(tiny_sd15, c, u, steps=2, cfg=4.0))
