"""Toy world: deterministic scene generator, the loader's real ComfyUI objects through stock nodes, the scorers'
separation on real renders, and the trained model's prompts recognizable by the scorers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import run_api, run_node, sample

from personalize import toy_world_nodes
from personalize.nodes import introspect
from personalize.toyworld import model as tw_model
from personalize.toyworld import scenes

TRAINED = tw_model.weights_present()
# the size the loader's model works at: the shipped model's (read from its file), the v1 layout for the random one
SIZE = tw_model.shipped_image_size() if TRAINED else tw_model.IMAGE_SIZE
LAT = SIZE // 8


# ------------------------------------------------------------------------------------------------ generator

def test_generator_is_deterministic_from_a_seed():
    a_img, a_mask, a_cap, a_sc = scenes.base_example(123)
    b_img, b_mask, b_cap, b_sc = scenes.base_example(123)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask) and a_cap == b_cap and a_sc == b_sc
    c_img, _, _, c_sc = scenes.base_example(124)
    assert c_sc != a_sc and np.abs(c_img - a_img).mean() > 0.02
    assert a_img.shape == (64, 64, 3) and a_img.dtype == np.float32 and 0 <= a_img.min() and a_img.max() <= 1
    assert 0.02 < a_mask.mean() < 0.6                      # the subject is drawn, not the whole frame
    r1 = [x[0] for x in scenes.subject_references(scenes.SUBJECTS[3])]
    r2 = [x[0] for x in scenes.subject_references(scenes.SUBJECTS[3])]
    assert all(np.array_equal(p, q) for p, q in zip(r1, r2))


def test_caption_grammar_and_held_out_subjects():
    sc = scenes.Scene("ball", "beach", color="red", pattern="striped")
    assert scenes.caption(sc) == "a photo of a red striped ball on the beach"
    e = scenes.Emblem("diagonal", "pink", "cyan", "ring", "black")
    assert scenes.caption(scenes.Scene("mug", "snow", color="pink", emblem=e)) == \
        "a photo of a diagonal split mug with a ring in the snow"       # no colour words for a two-tone body
    one = scenes.Emblem(scenes.NONE, "brown", "brown", "cross", "white")
    assert scenes.caption(scenes.Scene("star", "night", color="brown", emblem=one)) == \
        "a photo of a brown star with a cross under the night sky"
    assert scenes.caption(scenes.Scene("mug", "snow", emblem=e), token="sks") == "a photo of a sks mug in the snow"
    assert len(scenes.CLASSES) >= 6 and len(scenes.BACKGROUNDS) >= 6
    held = {s.emblem for s in scenes.SUBJECTS}
    assert len(held) == len(scenes.SUBJECTS) >= 10
    for s in scenes.SUBJECTS:
        refs = scenes.subject_references(s, 4)
        assert len(refs) == 4 and len({r[2].background for r in refs}) >= 3
        prompts = scenes.dreambench_prompts(s)
        assert len(prompts) == 10 and all(scenes.SUBJECT_TOKEN in p["prompt"] and s.cls in p["class_prompt"]
                                          for p in prompts)
        assert {p["background"] for p in prompts} == set(scenes.BACKGROUNDS)


def test_base_training_sees_the_whole_vocabulary_on_every_class():
    """World v2: every palette colour as body, split colour and symbol colour, every split kind and every symbol the
    held-out subjects use, on every class, appears in base training, each part often enough to learn."""
    looks = [scenes.base_scene(seed)[0] for seed in range(3000)]     # the scenes scenes.batch renders
    per_cls = {c: [sc for sc in looks if sc.cls == c] for c in scenes.CLASSES}
    for c, scs in per_cls.items():
        em = [sc.emblem for sc in scs if sc.emblem is not None]
        assert {e.split for e in em} >= set(scenes.SPLITS) and {e.symbol for e in em} >= set(scenes.SYMBOLS), c
        assert {e.a for e in em} | {sc.color for sc in scs} == set(scenes.PALETTE), c
    em = [sc.emblem for sc in looks if sc.emblem is not None]
    for part in scenes.SPLITS:
        assert sum(e.split == part for e in em) / len(looks) > 0.08
    for part in scenes.SYMBOLS:
        assert sum(e.symbol == part for e in em) / len(looks) > 0.06
    for col in scenes.PALETTE:
        assert sum(e.b == col for e in em if e.split != scenes.NONE) > 60
        assert sum(e.c == col for e in em if e.symbol != scenes.NONE) > 60
    full = [e for e in em if e.split != scenes.NONE and e.symbol != scenes.NONE]
    assert len(full) / len(looks) > 0.3                      # complete three-colour emblems, as the subjects have


def test_held_out_combinations_are_outside_the_training_samplers_support():
    """By enumeration: the raw look sampler's whole support (scenes.look_space) through the guard every training
    generator uses (scenes.admissible) excludes exactly the held-out emblems and their mirror images."""
    space = list(scenes.look_space())
    assert len(space) == len(set(space)) > 25_000
    rejected = {lk[2] for lk in space if not scenes.admissible(lk[2])}
    mirrors = {s.emblem.mirrored() for s in scenes.SUBJECTS}
    assert rejected == {s.emblem for s in scenes.SUBJECTS} | mirrors == set(scenes.HELD_OUT_EMBLEMS)
    assert {s.emblem for s in scenes.SUBJECTS} <= {lk[2] for lk in space}   # the guard is not vacuous
    # the raw sampler draws only inside look_space (its support is what was enumerated)
    rng, support = np.random.default_rng(5), set(space)
    assert all(scenes._draw_look(rng) in support for _ in range(3000))
    # the mirror image is a real equivalence: a flipped (symmetric) heart with a held-out emblem is the mirrored
    # emblem unflipped
    for s in scenes.SUBJECTS:
        if s.emblem.split in scenes.MIRROR_SWAPS:
            sc = scenes.Scene("heart", "grass", cx=0.5, emblem=s.emblem, flip=True)
            mir = scenes.Scene("heart", "grass", cx=0.5, emblem=s.emblem.mirrored(), flip=False)
            assert np.abs(scenes.render(sc)[0] - scenes.render(mir)[0]).max() < 1e-6


def _train_module():
    from scripts import train_toyworld
    return train_toyworld


def test_every_training_generator_draws_its_looks_through_the_held_out_guard(monkeypatch, tmp_path):
    """The base (UNet), VAE, scorer and segmenter data generators get every look from the guarded sampler: with the
    raw sampler made to offer each held-out emblem first, no generator lets one through."""
    tt = _train_module()
    held = sorted(scenes.HELD_OUT_EMBLEMS, key=repr)
    sentinel = ("cyan", "plain", scenes.Emblem("rim", "cyan", "black", "dot", "white"))
    offered = []

    def draw(rng):
        offered.append(1)
        k = len(offered) % (len(held) + 1)
        return sentinel if k == len(held) else ("red", "plain", held[k])

    assert tt.scenes is scenes                    # one module: the training script imports the pack's
    monkeypatch.setattr(scenes, "_draw_look", draw)
    rng = np.random.default_rng(0)
    made = {"base (the UNet's data, scenes.batch)": scenes.batch(range(3), size=16)[3],
            "training_scenes": scenes.training_scenes(rng, 3)}
    made["scorer classifier batch"], made["scorer contrastive views"] = tt.scorer_scenes(rng, 4)
    made["segmenter scenes"] = tt.segmenter_scenes(rng, 3)
    for name, scs in made.items():
        assert scs and all((sc.color, sc.pattern, sc.emblem) == sentinel for sc in scs), name
    # the VAE's batch (images only): each of its 3 scenes was offered every held-out emblem before the sentinel
    n = len(offered)
    imgs, masks = tt.render_training(rng, 3, 16)
    assert imgs.shape == (3, 3, 16, 16) and len(offered) - n == 3 * (len(held) + 1)
    # the segmenter's batches and its VAE round-trip pool (images only), likewise
    cfg = dict(tt.CONFIG["segmenter"], size=16, batch=3, vae_pool=2, vae_per_batch=1)
    n = len(offered)
    pool = tt.segmenter_vae_pool(cfg, tmp_path, torch.device("cpu"))
    assert pool[0].shape == (2, 3, 16, 16) and len(offered) - n == 2 * (len(held) + 1)
    n = len(offered)
    imgs, masks = tt.segmenter_batch(rng, cfg, pool)
    assert imgs.shape == (3, 3, 16, 16) and len(offered) - n == 2 * (len(held) + 1)   # 2 fresh + 1 from the pool
    assert offered and len(held) == 17


def test_training_stages_resume_without_losing_a_step(tmp_path):
    """Each stage stopped after 2 steps and resumed from its checkpoint ends bit-identical to an uninterrupted
    4-step run (weights, and the UNet's EMA), on a tiny config."""
    from safetensors.torch import load_file

    tt = _train_module()
    # (the VAE from scratch: the recipe's init, world v1's VAE, is read from the git history, which a shallow clone lacks)
    tiny = {"vae": ["--set", "init=", "--set", "batch=2", "--set", "size=64", "--set", "crop=32",
                    "--set", "calib_images=8", "--set", "save_every=100"],
            "unet": ["--set", "batch=2", "--set", "size=64", "--set", "n_images=8", "--set", "save_every=100"],
            "scorers": ["--set", "batch=4", "--set", "save_every=100"]}
    for stage in ("vae", "unet", "scorers"):
        out = {}
        for run in ("straight", "resumed"):
            d = tmp_path / run
            if stage == "unet":    # the UNet reads the VAE of its folder
                d.mkdir(exist_ok=True)
                (d / "vae.safetensors").write_bytes((tmp_path / "straight" / "vae.safetensors").read_bytes())
            base = [stage, "--out", str(d), "--steps", "4", "--threads", "1"] + tiny[stage]
            if run == "straight":
                tt.main(base)
            else:
                tt.main(base + ["--stop-after", "2"])
                assert torch.load(d / f"{stage}.ckpt", weights_only=False)["step"] == 2
                tt.main(base + ["--resume"])
            out[run] = load_file(str(d / f"{stage}.safetensors"))
        ck = torch.load(tmp_path / "resumed" / f"{stage}.ckpt", weights_only=False)
        assert ck["step"] == 4
        assert out["straight"].keys() == out["resumed"].keys()
        for k in out["straight"]:
            assert torch.equal(out["straight"][k], out["resumed"][k]), (stage, k)


def test_compact_context_equals_the_plain_clip_and_unet():
    """The UNet stage's compact cross-attention context: composed from per-word tokens and per-token rows, it equals
    ComfyUI's tokenizer + CLIP encode of every caption (distinct rows and multiplicities), and the UNet run on it
    equals the plain UNet on the 77-token context, in fp32 and under the recipe's bf16 autocast."""
    tt = _train_module()
    clip = tw_model.build_clip()
    unet = tw_model.model_config(tw_model.UNET_CONFIG_V2).get_model({}).diffusion_model
    from scripts.models import init_random_

    init_random_(unet, 3)
    cc = tt.CompactContext(clip, unet)
    rng = np.random.default_rng(5)
    caps = [scenes.random_caption(sc, rng) for sc in scenes.training_scenes(rng, 16)] + ["", "a photo of a sks mug"]
    cc.compact(caps)
    assert cc.verified >= 1   # compositions happened, and were checked against the CLIP inside compact()
    for c in caps:
        real = [t[0] for t in clip.tokenize(c)["l"][0]]
        assert cc.tokens(c) == real, c
        u, counts = torch.unique(cc.full([c])[0], dim=0, return_counts=True)
        ctx, bias = cc.compact([c])
        assert torch.equal(ctx[0], u) and torch.equal(bias[0], counts.float().log()), c
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([30.0, 500.0, 970.0])
    with torch.no_grad():
        ref = unet(x, t, context=cc.full(caps[:3]))
        ctx, bias = cc.compact(caps[:3])
        cc.install(bias)
        try:
            got = unet(x, t, context=ctx)
            with tt.autocast(torch.device("cpu"), {"amp": "bf16"}):
                got16 = unet(x, t, context=ctx).float()
        finally:
            cc.remove()
        with tt.autocast(torch.device("cpu"), {"amp": "bf16"}):
            ref16 = unet(x, t, context=cc.full(caps[:3])).float()
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() < 1e-5 * max(1.0, scale)
    assert (got16 - ref16).abs().max().item() < 0.05 * scale      # both bf16: rounding only
    assert (ref16 - ref).abs().max().item() > 0                    # the autocast really ran in bf16


def test_min_snr_weight_against_float64():
    """Min-SNR-gamma weights (eps-prediction): min(SNR, gamma) / SNR on the model's own schedule, computed in float64;
    1 wherever SNR <= gamma, below 1 only at low noise; all ones when min_snr is 0."""
    tt = _train_module()
    bm = tw_model.model_config(tw_model.UNET_CONFIG_V2).get_model({})
    ab = tt._alphas_cumprod(bm)
    w = tt.snr_weight(ab, {"min_snr": 5.0})
    ab64 = ab.double()
    snr = ab64 / (1 - ab64)
    assert torch.allclose(w.double(), torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr, rtol=1e-5)
    assert (w[snr <= 5] == 1).all() and (w[:50] < 1).all() and w[0] < 0.01
    assert torch.equal(tt.snr_weight(ab, {"min_snr": 0}), torch.ones_like(ab))
    assert torch.equal(tt.snr_weight(ab, {"min_snr": 5.0, "high_noise_cap": 0}), w)


def test_amp_auto_uses_bf16_only_where_the_device_has_it_natively(monkeypatch):
    """amp "auto": bf16 autocast on a CPU whose flags include avx512_bf16 (or amx_bf16), fp32 on an AVX2-only one
    (where emulated bf16 is slower than fp32); "bf16" and "" force it; anything else is refused by name."""
    from pathlib import Path

    tt = _train_module()
    cpu = torch.device("cpu")
    for flags, want in (("fpu avx2 avx512f avx512_bf16", True), ("fpu avx2 amx_bf16", True), ("fpu avx2 fma", False)):
        monkeypatch.setattr(Path, "read_text", lambda self, *a, _f=flags, **k: f"flags\t: {_f}\n")
        assert tt.native_bf16(cpu) is want
        assert tt.use_bf16(cpu, {"amp": "auto"}) is want
        assert tt.use_bf16(cpu, {"amp": "bf16"}) is True and tt.use_bf16(cpu, {"amp": ""}) is False
        with tt.autocast(cpu, {"amp": "auto"}):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == (torch.bfloat16 if want else torch.float32)
    with pytest.raises(SystemExit, match="amp='fp8'"):
        tt.use_bf16(cpu, {"amp": "fp8"})


def test_high_noise_weight_is_the_truncated_v_loss_weight_in_float64():
    """high_noise_cap: the Min-SNR weight times min(1 + sigma^2, cap), sigma^2 = 1 / SNR, on the model's own
    schedule against float64; it reaches the cap at high noise, stays near 1 at low noise, and never decreases
    with the noise level."""
    tt = _train_module()
    bm = tw_model.model_config(tw_model.UNET_CONFIG_V2).get_model({})
    ab = tt._alphas_cumprod(bm)
    w = tt.snr_weight(ab, {"min_snr": 5.0, "high_noise_cap": 10.0}).double()
    ab64 = ab.double()
    snr = ab64 / (1 - ab64)
    want = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr * torch.clamp(1 + 1 / snr, max=10.0)
    assert torch.allclose(w, want, rtol=1e-5)
    assert w[-1] == 10.0 and w[snr <= 5].min() >= 1.0 and (w[1:] >= w[:-1] - 1e-6).all()


# ------------------------------------------------------------------------------------------------ model / loader

def _encode(clip, text):
    import nodes

    return nodes.CLIPTextEncode().encode(clip, text)[0]


@pytest.fixture(scope="module")
def toy():
    source = "trained" if TRAINED else "random (untrained)"
    return run_node(toy_world_nodes.ToyWorldLoader, source=source)


def test_loader_objects_are_real_comfy_objects_sd15_family(toy):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.sd

    model, clip, vae = toy
    assert isinstance(model, comfy.model_patcher.ModelPatcher) and type(model.model) is comfy.model_base.BaseModel
    assert isinstance(clip, comfy.sd.CLIP) and isinstance(vae, comfy.sd.VAE)
    assert introspect.family(model) == "sd15" and len(introspect.transformer_blocks(model)) == 16
    n = sum(p.numel() for p in model.model.diffusion_model.parameters())
    assert n < 6e6


def test_bag_of_words_text_encoder_matches_its_definition(toy):
    _, clip, _ = toy
    text = "a photo of a red striped ball on the beach"
    cond = _encode(clip, text)[0][0]
    ids = torch.tensor([t[0] for t in clip.tokenize(text)["l"][0]])
    ref = torch.nn.functional.layer_norm(tw_model.token_table()[ids], (768,))
    assert cond.shape == (1, 77, 768)
    torch.testing.assert_close(cond[0].float(), ref, atol=2e-3, rtol=2e-3)   # ComfyUI may run it in fp16


def test_loader_objects_sample_through_stock_ksampler_and_vae(toy):
    import nodes

    model, clip, vae = toy
    pos, neg = _encode(clip, "a photo of a red ball on the grass"), _encode(clip, "")
    before = sample(model, pos, neg, steps=4, seed=3, size=(LAT, LAT))
    lat = sample(model, pos, neg, steps=4, seed=3, size=(LAT, LAT))
    assert lat.shape == (1, 4, LAT, LAT) and torch.isfinite(lat).all()
    assert torch.equal(before, lat)                      # deterministic from the seed
    with torch.inference_mode():
        img = nodes.VAEDecode().decode(vae, {"samples": lat})[0]
    assert img.shape == (1, SIZE, SIZE, 3) and 0 <= img.min() and img.max() <= 1
    with torch.inference_mode():
        back = nodes.VAEEncode().encode(vae, img)[0]["samples"]
    assert back.shape == (1, 4, LAT, LAT)


def test_subject_node_renders_references():
    imgs, masks, prompt, class_prompt = run_node(toy_world_nodes.ToyWorldSubject, subject=scenes.SUBJECTS[0].name,
                                                 references=3, prompt_index=1)
    # by default at the shipped model's size (the file's recipe says which), or at the size asked for
    assert imgs.shape == (3, toy_world_nodes.SIZE, toy_world_nodes.SIZE, 3)
    assert masks.shape == (3, toy_world_nodes.SIZE, toy_world_nodes.SIZE)
    assert toy_world_nodes.SIZE == (tw_model.image_size() if TRAINED else tw_model.IMAGE_SIZE)
    assert "sks" in prompt and "sks" not in class_prompt
    small, small_masks, *_ = run_node(toy_world_nodes.ToyWorldSubject, subject=scenes.SUBJECTS[0].name, references=2,
                                      prompt_index=1, size=32)
    assert small.shape == (2, 32, 32, 3) and small_masks.shape == (2, 32, 32)
    from personalize.nodes.errors import InputError

    with pytest.raises(InputError, match="subject"):
        run_node(toy_world_nodes.ToyWorldSubject, subject="nope", references=3, prompt_index=1)
    with pytest.raises(InputError, match="size.*multiple of 8"):
        run_node(toy_world_nodes.ToyWorldSubject, subject=scenes.SUBJECTS[0].name, references=1, prompt_index=1,
                 size=36)


# ------------------------------------------------------------------------------------------------ scorers

SCORERS_PRESENT = (tw_model.os.path.isfile(tw_model.os.path.join(tw_model.WEIGHTS_DIR, "scorers.safetensors")))


@pytest.fixture(scope="module")
def scorers():
    if not SCORERS_PRESENT:
        pytest.fail("weights/toyworld/scorers.safetensors missing: run scripts/train_toyworld.py scorers")
    from personalize.toyworld.scorers import Scorers

    return Scorers()


def _renders(subject, n, seed, background=None):
    rng = np.random.default_rng(seed)
    return np.stack([scenes.render(scenes.subject_scene(subject, rng, background))[0] for _ in range(n)])


def test_scorers_separate_real_renders_of_instances_and_backgrounds(scorers):
    # subject fidelity: new renders of a held-out subject vs its references (ceiling) against renders of the other
    # held-out subject of the same class (floor): the instance embedder never saw any held-out subject
    same, other = [], []
    for s in scenes.SUBJECTS:
        refs = np.stack([r[0] for r in scenes.subject_references(s)])
        twin = next(t for t in scenes.SUBJECTS if t.cls == s.cls and t != s)
        same.append(scorers.subject_fidelity(_renders(s, 6, 11), refs))
        other.append(scorers.subject_fidelity(_renders(twin, 6, 11), refs))
    same, other = np.array(same), np.array(other)
    print(f"\nsubject fidelity on real renders: same subject {same.mean():.3f}, other subject of the class "
          f"{other.mean():.3f}, same > other for {(same > other).sum()}/{len(same)} subjects")
    assert same.mean() > other.mean() + 0.2 and (same > other).mean() >= 0.9
    # prompt fidelity: class and background classifiers on fresh base renders and held-out subjects
    _, _, _, sc = scenes.batch(range(50_000, 50_120))
    imgs = np.stack([scenes.render(s)[0] for s in sc])
    pf = scorers.prompt_fidelity(imgs, [s.cls for s in sc], [s.background for s in sc])
    subj_imgs, cls_, bgs = [], [], []
    for i, s in enumerate(scenes.SUBJECTS):
        for bg in scenes.BACKGROUNDS:
            subj_imgs.append(_renders(s, 1, 100 + i, bg)[0])
            cls_.append(s.cls)
            bgs.append(bg)
    ps = scorers.prompt_fidelity(np.stack(subj_imgs), cls_, bgs)
    print(f"prompt fidelity on real renders: base {pf}, held-out subjects {ps}")
    assert pf["class"] > 0.9 and pf["background"] > 0.95 and ps["prompt"] > 0.85
    # a wrong prompt scores at chance or below: the classifiers read the image, not the label
    wrong = scorers.prompt_fidelity(imgs, [scenes.CLASSES[(scenes.CLASSES.index(s.cls) + 1) % 6] for s in sc],
                                    [s.background for s in sc])
    assert wrong["class"] < 0.1


def test_shipped_vae_round_trip_keeps_the_subjects(scorers):
    """The shipped VAE (world v2, 128 px): VAE round-trips of held-out subjects' renders stay close to the subject
    (instance embedder, against the subject's references), on a fixed set: one prompt render each, one batch."""
    from safetensors.torch import load_file

    vae = tw_model.build_vae(load_file(tw_model.os.path.join(tw_model.WEIGHTS_DIR, "vae.safetensors")))
    real = torch.from_numpy(np.concatenate([scenes.prompt_renders(s, 1, SIZE, prompts=1) for s in scenes.SUBJECTS]))
    with torch.inference_mode():
        rt = vae.decode(vae.encode(real)).float().clamp(0, 1).reshape(real.shape)
    fid = np.array([scorers.subject_fidelity(rt[i:i + 1],
                                             np.stack([r[0] for r in scenes.subject_references(s, size=SIZE)]))
                    for i, s in enumerate(scenes.SUBJECTS)])
    print(f"\nshipped VAE round-trips: subject fidelity mean {fid.mean():.3f}, worst {fid.min():.3f}")
    assert fid.mean() >= 0.75 and fid.min() >= 0.65      # issue #12's bars; measured: mean 0.875, worst 0.806


def test_loader_builds_the_unet_of_the_size_its_weights_were_trained_at(toy):
    """``load`` reads the image size from the UNet file's recipe: the shipped world-v2 set is 128 px (4 heads,
    16x16 latents); the random model keeps the 64 px config (2 heads); a size with no config is refused, naming it."""
    assert tw_model.image_size(tw_model.WEIGHTS_DIR) == 128 == SIZE
    attn = toy[0].model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1
    assert attn.heads == 4 and toy[0].model.model_config.unet_config["image_size"] == 16
    assert tw_model.unet_config_for(tw_model.IMAGE_SIZE)["num_heads"] == 2
    with pytest.raises(ValueError, match="96 px"):
        tw_model.unet_config_for(96)


def test_trained_model_prompts_are_recognizable(toy, scorers):
    """A prompt's class and background are recognized by the scorers in images the trained model generates."""
    if not TRAINED:
        pytest.fail("weights/toyworld/unet.safetensors missing: run scripts/train_toyworld.py vae/unet")
    import nodes

    model, clip, vae = toy
    imgs, cls_, bgs = [], [], []
    for i, bg in enumerate(scenes.BACKGROUNDS):
        c = scenes.CLASSES[i]
        pos = _encode(clip, f"a photo of a {c} {scenes.BACKGROUNDS[bg]}")
        lat = sample(model, pos, _encode(clip, ""), steps=10, cfg=5.0, seed=7 + i, size=(LAT, LAT), batch=2)
        with torch.inference_mode():
            imgs.append(nodes.VAEDecode().decode(vae, {"samples": lat})[0])
        cls_ += [c] * 2
        bgs += [bg] * 2
    pf = scorers.prompt_fidelity(torch.cat(imgs), cls_, bgs)
    print(f"\ngenerated (12 images, 10 euler steps, cfg 5): background {pf['background']:.2f}, class {pf['class']:.2f} "
          f"(chance 0.17 each)")
    # issue #12's bar for the shipped model's generations (measured in docs/toyworld.md)
    assert pf["background"] >= 0.9 and pf["class"] >= 0.8


# ------------------------------------------------------------------------------------------------ example workflows

def _object_info(class_type):
    import nodes

    import personalize

    cls = {**nodes.NODE_CLASS_MAPPINGS, **personalize.NODE_CLASS_MAPPINGS}[class_type]
    it = cls.INPUT_TYPES()
    return {"input": it, "input_order": {k: list(v.keys()) for k, v in it.items()},
            "output": list(cls.RETURN_TYPES)}, cls


def _run_api(api):
    """Execute an API-format prompt in-process, node by node (SaveImage: returns its images instead of writing)."""
    import nodes

    import personalize

    return run_api(api, {**nodes.NODE_CLASS_MAPPINGS, **personalize.NODE_CLASS_MAPPINGS})


@pytest.mark.parametrize("name", ["toyworld_txt2img.json", "toyworld_bootpig.json"])
def test_example_workflows_convert_and_run_on_the_toy_model(name):
    import json
    from pathlib import Path

    from scripts import workflow as wf

    ui = json.loads((Path(__file__).resolve().parents[1] / "example_workflows" / name).read_text())
    info = {n["type"]: _object_info(n["type"])[0] for n in ui["nodes"] if n["type"] not in wf.NOTE_TYPES}
    api = wf.ui_to_api(ui, info)
    for n in api.values():                         # a few steps keep the test fast
        if n["class_type"] == "KSampler":
            n["inputs"]["steps"] = 4
        if n["class_type"] == "PersonalizeToyWorldLoader" and not TRAINED:
            n["inputs"]["source"] = "random (untrained)"
    saved = _run_api(api)   # the generations (batch 4); the BootPIG workflow also saves its 4 reference renders
    assert len(saved) == (2 if "bootpig" in name else 1)
    assert all(images.shape == (4, SIZE, SIZE, 3) and torch.isfinite(images).all() for images in saved)
