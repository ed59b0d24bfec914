"""Subject-Diffusion: location channel, conv_in expansion, gated adapters, image prompt, SAM masks, trainer.

Tiny seeded-random models in the real layouts (real comfy classes, real segment-anything SAM architecture at small
width); no weights are downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import run_node, sample

from personalize import subject_diffusion_nodes as sdn
from personalize.nodes import adapters as ad
from personalize.nodes import location as loc
from personalize.nodes import sam as sam_lib
from personalize.nodes import subject_training as st
from personalize.nodes.errors import InputError
from scripts import models

REPO = Path(__file__).resolve().parents[1]
TINY_VISION = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": 32, "image_size": 224,
               "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-5,
               "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3,
               "num_hidden_layers": 2, "patch_size": 56, "projection_dim": 24, "torch_dtype": "float32"}


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def clip_vision(tmp_path_factory):
    """A real comfy.clip_vision.ClipVisionModel (CLIP ViT layout at 224 px; patch 56 -> 16 patch tokens to keep CPU tests
    fast), tiny and random."""
    import comfy.clip_vision

    cfg = tmp_path_factory.mktemp("clipvision") / "config.json"
    cfg.write_text(json.dumps(TINY_VISION))
    cv = comfy.clip_vision.ClipVisionModel(str(cfg))
    models.init_random_(cv.model, seed=3)
    return cv


@pytest.fixture(scope="module")
def clip():
    return models.build_clip(tiny=True, seed=1)


@pytest.fixture(scope="module")
def vae():
    return models.build_vae(seed=2)


@pytest.fixture(scope="module")
def expanded(tiny_sd15):
    return run_node(sdn.ExpandInputChannels, model=tiny_sd15)[0]


@pytest.fixture(scope="module")
def zero_weights(expanded, clip_vision):
    """Zero-init parts with a narrow hidden width (64 instead of the paper's 1024) to keep CPU tests fast."""
    width, tokens, embed = ad.vision_dims(clip_vision)
    return ad.init_weights(expanded, width, tokens, embed, hidden=64, seed=0)


def test_zero_init_weights_node(expanded, clip_vision):
    w = run_node(sdn.SubjectDiffusionInitWeights, model=expanded, clip_vision=clip_vision, seed=0)[0]
    cfg = w.config
    assert (cfg["vision_width"], cfg["vision_tokens"], cfg["embed_dim"], cfg["hidden"]) == (32, 16, 24, 1024)
    assert cfg["text_width"] == 768 and len(cfg["blocks"]) == 16 and not w.trained
    assert all(float(a.alpha_attn) == 0.0 and float(a.alpha_dense) == 0.0 for a in w.modules.adapters)
    assert torch.count_nonzero(w.modules.grounding.null_image) == 0


@pytest.fixture(scope="module")
def sam_model():
    """Real SAM architecture (segment-anything's _build_sam) at a small encoder width, random weights."""
    torch.manual_seed(0)
    with torch.inference_mode(False):
        return sam_lib.build(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                             encoder_global_attn_indexes=[1])


def conds(seed=0):
    return models.random_conditioning("sd15", seed=seed), models.random_conditioning("sd15", seed=seed + 100)


def latent(h=8, w=8):
    return {"samples": torch.zeros(1, 4, h, w)}


def with_location(model, boxes="8, 8, 32, 40", **kw):
    return run_node(sdn.LocationMaskConcat, model=model, latent=latent(), boxes=boxes, **kw)[0]


def square_masks(n=1, size=64):
    m = torch.zeros(n, size, size)
    m[0, 8:40, 4:36] = 1
    if n > 1:
        m[1, 30:60, 36:62] = 1
    return m


# ------------------------------------------------------------------------------------------------- expansion
def test_expansion_zero_channel_and_identical_output(tiny_sd15, expanded):
    base_conv = tiny_sd15.model.diffusion_model.input_blocks[0][0]
    new_conv = expanded.get_model_object(loc.CONV_IN)
    assert new_conv is not base_conv and base_conv.weight.shape[1] == 4
    assert new_conv.weight.shape[1] == 5
    assert torch.equal(new_conv.weight[:, :4], base_conv.weight)          # bit-exact copy
    assert torch.count_nonzero(new_conv.weight[:, 4]) == 0                # the new channel starts at zero
    assert torch.equal(new_conv.bias, base_conv.bias)
    assert loc.input_channels(tiny_sd15) == 4 and loc.input_channels(expanded) == 5
    pos, neg = conds()
    ref = sample(tiny_sd15, pos, neg, cfg=5.0, steps=1)
    out = sample(with_location(expanded), pos, neg, cfg=5.0, steps=1)
    # the 5-channel conv sums one more (zero) term: equal up to float reassociation
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # ... and the zero channel is what makes it so: a non-zero location weight changes the output
    bumped = expanded.clone()
    conv2 = loc.expanded_conv(base_conv, 1)
    with torch.no_grad():
        conv2.weight[:, 4] = 0.5
    bumped.add_object_patch(loc.CONV_IN, conv2)
    assert not torch.allclose(sample(with_location(bumped), pos, neg, cfg=5.0, steps=1), ref, atol=1e-3)
    with pytest.raises(InputError, match="not yet expanded"):
        run_node(sdn.ExpandInputChannels, model=expanded)


# -------------------------------------------------------------------------------------------- location channel
def direct_channel(boxes, h, w, f=8):
    out = torch.ones(1, 1, h, w)
    for (x, y, bw, bh) in boxes:
        for i in range(h):
            for j in range(w):
                if x <= f * j < x + bw and y <= f * i < y + bh:
                    out[0, 0, i, j] *= 0.0
    return out


def test_location_channel_values_resolution_and_two_subject_product(expanded):
    boxes = [(8, 16, 24, 32), (20, 0, 30, 24)]
    text = "\n".join(", ".join(map(str, b)) for b in boxes)
    m = run_node(sdn.LocationMaskConcat, model=expanded, latent={"samples": torch.zeros(1, 4, 8, 10)}, boxes=text)[0]
    ch = loc.find_location(m).channel
    assert ch.shape == (1, 1, 8, 10)                                       # latent resolution
    assert set(ch.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(ch, direct_channel(boxes, 8, 10))
    one = [direct_channel([b], 8, 10) for b in boxes]
    assert torch.equal(ch, one[0] * one[1])                                # two subjects multiplied
    assert (one[0] * one[1] != torch.minimum(one[0], one[1])).sum() == 0 and (ch == 0).sum() > (one[0] == 0).sum()
    # a mask at pixel resolution gives the same map as its box
    mask = torch.zeros(1, 64, 80)
    mask[0, 16:48, 8:32] = 1
    mm_ = run_node(sdn.LocationMaskConcat, model=expanded, latent={"samples": torch.zeros(1, 4, 8, 10)}, boxes="",
                   mask=mask)[0]
    assert torch.equal(loc.find_location(mm_).channel, direct_channel([boxes[0]], 8, 10))


@pytest.mark.parametrize("uncond", ["same", "zero"])
def test_location_channel_reaches_every_unet_call_including_cfg_rows(expanded, uncond):
    import comfy.patcher_extension as pe

    m = with_location(expanded, boxes="8, 8, 32, 40", uncond_mask=uncond)
    want = direct_channel([(8, 8, 32, 40)], 8, 8)[0, 0]
    seen = []

    def spy(executor, x, timesteps, context, y, control, transformer_options, **kw):
        seen.append((x.detach().clone(), list(transformer_options["cond_or_uncond"])))
        return executor(x, timesteps, context, y, control, transformer_options, **kw)

    m = m.clone()
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test_spy", spy)
    pos, neg = conds()
    sample(m, pos, neg, steps=2, cfg=5.0)
    assert len(seen) == 2
    for x, cou in seen:
        assert x.shape[1] == 5 and sorted(cou) == [0, 1]                # both CFG branches in the call
        chunk = x.shape[0] // len(cou)
        for r in range(x.shape[0]):
            kind = cou[r // chunk]
            expect = torch.zeros_like(want) if (uncond == "zero" and kind == 1) else want
            assert torch.equal(x[r, 4], expect), (r, kind)


def test_location_bad_inputs_are_clear_errors(tiny_sd15, expanded):
    with pytest.raises(InputError, match=r"input 'model'.*5 channels.*4 input channels"):
        with_location(tiny_sd15)
    with pytest.raises(InputError, match=r"input 'boxes'.*inside the 64x64 image"):
        with_location(expanded, boxes="40, 8, 32, 16")
    with pytest.raises(InputError, match=r"input 'boxes'.*inside"):
        with_location(expanded, boxes="-1, 0, 8, 8")
    with pytest.raises(InputError, match=r"input 'mask'.*empty mask"):
        with_location(expanded, boxes="", mask=torch.zeros(1, 64, 64))
    with pytest.raises(InputError, match=r"at least one subject"):
        with_location(expanded, boxes="")
    with pytest.raises(InputError, match=r"at most 2 subjects"):
        with_location(expanded, boxes="0,0,8,8\n8,8,8,8\n16,16,8,8")
    with pytest.raises(InputError, match=r"'x, y, w, h'"):
        with_location(expanded, boxes="1, 2, 3")


# --------------------------------------------------------------------------------------------------- adapters
def test_zero_init_adapters_identical_and_trained_gates_change_output(expanded, zero_weights, clip_vision):
    img = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    base = with_location(expanded)
    adapted = run_node(sdn.SubjectAdapter, model=base, weights=zero_weights, clip_vision=clip_vision, image=img)[0]
    patch = adapted.model_options["transformer_options"]["patches"]["middle_patch"][-1]
    assert isinstance(patch, ad.AdapterPatch) and len(patch.index) == 16
    assert patch.objs.shape == (1, 16, zero_weights.config["hidden"])
    pos, neg = conds()
    ref = sample(base, pos, neg, steps=1)
    calls = []
    orig = ad.gated

    def counting(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    ad.gated = counting
    try:
        out = sample(adapted, pos, neg, steps=1)
    finally:
        ad.gated = orig
    assert len(calls) == 16                          # every block, every step (cond+uncond in one call)
    assert torch.equal(out, ref)                         # bit-exact: tanh(0) = 0
    # open the gates on a copy of the weights: now the adapters act
    import copy

    mods = copy.deepcopy(zero_weights.modules)
    with torch.no_grad():
        for a in mods.adapters:
            a.alpha_attn.fill_(0.5)
            a.alpha_dense.fill_(0.5)
    opened = ad.SubjectWeights(zero_weights.config, mods, {}, True, 1)
    adapted2 = run_node(sdn.SubjectAdapter, model=base, weights=opened, clip_vision=clip_vision, image=img)[0]
    assert not torch.allclose(sample(adapted2, pos, neg, steps=1), ref, atol=1e-4)
    # strength 0 = unpatched, bit-exact
    off = run_node(sdn.SubjectAdapter, model=base, weights=opened, clip_vision=clip_vision, image=img,
                   strength=0.0)[0]
    assert torch.equal(sample(off, pos, neg, steps=1), ref)


def test_grounding_fourier_and_null_objects(zero_weights):
    box = torch.tensor([[0.1, 0.2, 0.5, 0.9]])
    f = ad.fourier(box)
    assert f.shape == (1, 64)
    k = torch.arange(8, dtype=torch.float32)
    freqs = 100 ** (k / 8)
    expect = torch.cat([torch.cat([torch.sin(fr * box), torch.cos(fr * box)], -1) for fr in freqs], -1)
    torch.testing.assert_close(f, expect)
    cfg = zero_weights.config
    tokens = torch.randn(2, cfg["vision_tokens"], cfg["vision_width"])
    objs, null = ad.adapter_tokens(zero_weights, tokens, torch.rand(2, 4), use_bbox=False)
    assert objs.shape == null.shape == (1, 2 * cfg["vision_tokens"], cfg["hidden"])
    assert not torch.allclose(objs, null)
    # null objects do not depend on the reference
    _, null2 = ad.adapter_tokens(zero_weights, torch.randn_like(tokens), torch.rand(2, 4), use_bbox=False)
    torch.testing.assert_close(null, null2)


def test_adapter_bad_inputs(expanded, zero_weights, clip_vision):
    import dataclasses

    img = torch.rand(1, 64, 64, 3)
    with pytest.raises(InputError, match=r"input 'mask'.*empty mask"):
        run_node(sdn.SubjectAdapter, model=expanded, weights=zero_weights, clip_vision=clip_vision, image=img,
                 mask=torch.zeros(1, 64, 64))
    with pytest.raises(InputError, match=r"input 'boxes'.*inside"):
        run_node(sdn.SubjectAdapter, model=expanded, weights=zero_weights, clip_vision=clip_vision, image=img,
                 boxes="60, 60, 10, 10", latent=latent())
    other = dataclasses.replace(zero_weights, config={**zero_weights.config,
                                                      "blocks": zero_weights.config["blocks"][:-1]})
    with pytest.raises(InputError, match=r"input 'weights'.*architecture"):
        run_node(sdn.SubjectAdapter, model=expanded, weights=other, clip_vision=clip_vision, image=img)
    with pytest.raises(InputError, match=r"input 'image'.*1 or 2"):
        run_node(sdn.SubjectAdapter, model=expanded, weights=zero_weights, clip_vision=clip_vision,
                 image=torch.rand(3, 64, 64, 3))


# ----------------------------------------------------------------------------------------------------- SAM
def synthetic_photo():
    img = torch.full((1, 64, 64, 3), 0.4)
    img[0, 16:48, 20:44] = torch.tensor([0.9, 0.1, 0.1])
    return img


def test_sam_mask_shapes_and_white_outside(sam_model, tmp_path):
    img = synthetic_photo()
    mask, on_white = run_node(sdn.SubjectMaskSAM, sam_model=sam_model, image=img, box="16, 12, 32, 40", points="")
    assert mask.shape == (1, 64, 64) and on_white.shape == (1, 64, 64, 3)
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and mask.sum() > 0
    out = mask[0] == 0
    assert torch.equal(on_white[0][out], torch.ones_like(on_white[0][out]))        # white background
    assert torch.equal(on_white[0][~out], img[0][~out])                            # subject pixels kept
    # checkpoints load with torch.load(weights_only=True), architecture read from the file
    path = tmp_path / "sam_tiny.pth"
    torch.save(sam_model.state_dict(), path)
    loaded = run_node(sdn.SAMLoader, sam_name=str(path))[0]
    assert sam_lib.infer_config(sam_model.state_dict()) == {"encoder_embed_dim": 32, "encoder_depth": 2,
                                                             "encoder_num_heads": 2, "encoder_global_attn_indexes": [1]}
    sd0, sd1 = sam_model.state_dict(), loaded.state_dict()
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    mask3, white3 = run_node(sdn.SubjectMaskSAM, sam_model=sam_model, image=img, box="", points="32, 32")
    assert mask3.shape == (1, 64, 64) and torch.equal(white3[0][mask3[0] == 0], torch.ones_like(white3[0][mask3[0] == 0]))


def test_sam_automatic_mode_keeps_the_most_central_mask(sam_model):
    import numpy as np

    a = np.zeros((20, 20), bool)
    a[0:5, 0:5] = True                       # corner
    b = np.zeros((20, 20), bool)
    b[8:13, 7:12] = True                     # centre
    assert sam_lib.most_central([a, b, np.zeros((20, 20), bool)], 20, 20) is b
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False
    assert sam_lib.fill_holes(ring)[4, 4] and not sam_lib.fill_holes(ring)[0, 0]
    # the real generator on the random SAM: a mask of the image size, or the clear 'no mask' error
    img = synthetic_photo()
    try:
        mask, white = run_node(sdn.SubjectMaskSAM, sam_model=sam_model, image=img, box="", points="",
                               points_per_side=4)
    except InputError as e:
        assert "automatic generator" in str(e)
    else:
        assert mask.shape == (1, 64, 64) and white.shape == (1, 64, 64, 3)


def test_sam_bad_inputs(sam_model):
    img = synthetic_photo()
    with pytest.raises(InputError, match=r"input 'box'.*inside the 64x64 image"):
        run_node(sdn.SubjectMaskSAM, sam_model=sam_model, image=img, box="40, 40, 40, 40", points="")
    with pytest.raises(InputError, match=r"input 'points'.*inside"):
        run_node(sdn.SubjectMaskSAM, sam_model=sam_model, image=img, box="", points="70, 3")
    with pytest.raises(InputError, match=r"input 'sam_model'"):
        run_node(sdn.SubjectMaskSAM, sam_model="nope", image=img, box="", points="")


# ------------------------------------------------------------------------------------------------ training
def training_examples():
    g = torch.Generator().manual_seed(5)
    imgs = torch.rand(2, 64, 64, 3, generator=g)
    m = square_masks(2)
    return [st.Example(imgs[0], m, "a photo on the grass", ["dog", "cat"])]


@pytest.fixture(scope="module")
def trainer(expanded, clip, vae, clip_vision, zero_weights):
    return st.SubjectTrainer(expanded, clip, vae, clip_vision, zero_weights, training_examples(), lr=2e-3,
                             warmup=0, seed=0, device=torch.device("cpu"))


def test_trainer_holds_no_second_copy_of_the_frozen_unet(trainer, expanded, clip):
    """The trainer's UNet aliases the model's storage; only conv_in and attn2 k/v are cloned. The text encoder is
    aliased too where its dtype is the compute dtype (ComfyUI keeps CLIP in fp16 even on the CPU, where training
    computes in fp32: there, and only there, it is cast)."""
    from personalize.nodes.frozen_weights import shares_storage

    theirs = dict(expanded.model.diffusion_model.named_parameters())
    ours = dict(trainer.unet.named_parameters())
    trained = set(trainer.train_names)
    assert len(trained) == 2 + 32 and set(ours) == set(theirs)
    for k, t in theirs.items():
        assert shares_storage(ours[k], t) != (k in trained), k
    te_theirs = dict(clip.cond_stage_model.named_parameters())
    assert all(shares_storage(p, te_theirs[k]) or p.dtype != te_theirs[k].dtype
               for k, p in trainer.text.named_parameters())


def test_attention_control_loss_matches_direct_computation(trainer):
    keys = trainer.attn_keys
    assert sorted((k.name, k.id) for k in keys) == sorted(
        [("input", 4), ("input", 5), ("input", 7), ("input", 8), ("middle", 0)] + [("output", i) for i in range(3, 9)])
    # capture q and k of every selected attn2 and recompute the balanced L1 in float64 with explicit loops
    cap = {}
    hooks = []
    unet = trainer.unet
    for key in keys:
        blk = {"input": unet.input_blocks[key.id], "middle": unet.middle_block,
               "output": unet.output_blocks[key.id]}[key.name]
        attn = [m for m in blk if hasattr(m, "transformer_blocks")][0].transformer_blocks[key.index].attn2
        hooks.append(attn.to_q.register_forward_hook(lambda m, i, o, key=key: cap.__setitem__((key, "q"), o)))
        hooks.append(attn.to_k.register_forward_hook(lambda m, i, o, key=key: cap.__setitem__((key, "k"), o)))
        cap[(key, "heads")] = attn.heads
    try:
        with torch.no_grad():
            mse, attn_loss = trainer.losses(0, 500, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)))
    finally:
        for h in hooks:
            h.remove()
    ex = trainer.examples[0]
    idx, segs = ex["idx"][0].tolist(), ex["segs"][0]
    assert len(idx) == 4 and idx[1] == idx[0] - 2                      # "sks" and the entity word, per subject
    per_layer = []
    for key in keys:
        q, k, heads = cap[(key, "q")].double(), cap[(key, "k")].double(), cap[(key, "heads")]
        n = q.shape[1]
        side = int(round(n ** 0.5))
        d = q.shape[-1] // heads
        seg = torch.nn.functional.interpolate(segs[None].float(), size=(side, side), mode="bilinear", antialias=True,
                                              align_corners=False)[0].reshape(len(idx), -1).double()
        total = 0.0
        for o, tok in enumerate(idx):
            for hh in range(heads):
                qh, kh = q[0, :, hh * d:(hh + 1) * d], k[0, :, hh * d:(hh + 1) * d]
                p = torch.softmax(qh @ kh.T / d ** 0.5, dim=-1)[:, tok]
                obj, bg = seg[o], 1 - seg[o]
                total += float((p * bg).sum() / (bg.sum() + 1e-5) - (p * obj).sum() / (obj.sum() + 1e-5)) / heads
        per_layer.append(total / (len(idx) + 1e-5))
    direct = sum(per_layer) / len(per_layer)
    assert abs(float(attn_loss) - direct) < 1e-5 * max(1.0, abs(direct)), (float(attn_loss), direct)
    assert abs(direct) > 1e-6


def test_training_steps_lower_the_loss(trainer, expanded, zero_weights):
    before = trainer.evaluate(timesteps=(300, 700))
    log = trainer.train(6)
    after = trainer.evaluate(timesteps=(300, 700))
    tb = before[0] + 0.01 * before[1]
    ta = after[0] + 0.01 * after[1]
    assert ta < tb, (before, after, log)
    res = trainer.result()
    assert res.trained and res.steps == 6
    assert set(res.unet) >= {"input_blocks.0.0.weight", "input_blocks.0.0.bias"}
    assert sum(1 for k in res.unet if ".attn2.to_k." in k) == 16 and sum(1 for k in res.unet if ".attn2.to_v." in k) == 16
    assert any(float(a.alpha_attn) != 0.0 for a in res.modules.adapters)      # gates moved
    # the zero-init weights and the parent model were not touched
    assert all(float(a.alpha_attn) == 0.0 for a in zero_weights.modules.adapters)
    assert torch.count_nonzero(expanded.get_model_object(loc.CONV_IN).weight[:, 4]) == 0


def test_trainer_node_saves_and_loader_round_trips(expanded, clip, vae, clip_vision, zero_weights, tmp_path):
    """The node path (under inference mode, as ComfyUI runs it): train, save to models/subject_diffusion, load."""
    import folder_paths

    g = torch.Generator().manual_seed(7)
    paths_, _ = folder_paths.folder_names_and_paths["subject_diffusion"]
    paths_.insert(0, str(tmp_path))
    try:
        model_t, w, log = run_node(sdn.SubjectDiffusionTrainer, model=expanded, clip=clip, vae=vae,
                                   clip_vision=clip_vision, weights=zero_weights,
                                   images=torch.rand(1, 64, 64, 3, generator=g), masks=square_masks(2),
                                   captions="a photo on the grass", labels="dog, cat", subjects_per_image=2, steps=2,
                                   learning_rate=1e-3, warmup_steps=0, attention_loss_weight=0.01, seed=0,
                                   save_name="node_trained")
        assert (tmp_path / "node_trained.safetensors").is_file() and "saved" in log and log.count("step ") == 2
        model2, w2 = run_node(sdn.SubjectDiffusionLoader, model=expanded, weights_name="node_trained.safetensors")
    finally:
        paths_.remove(str(tmp_path))
    assert w.trained and w2.trained and w2.steps == 2
    for (k1, v1), (k2, v2) in zip(sorted(w.state_dict().items()), sorted(w2.state_dict().items())):
        assert k1 == k2 and torch.equal(v1, v2)
    assert torch.equal(model2.get_model_object(loc.CONV_IN).weight, w.unet["input_blocks.0.0.weight"])
    assert sum(1 for k in model2.patches if ".attn2.to_k." in k or ".attn2.to_v." in k) == 32
    assert not expanded.patches                                           # the input model is untouched
    # the image prompt works with trained weights and fuses the subject at the placeholder
    img = torch.rand(1, 64, 64, 3, generator=g)
    cond = run_node(sdn.SubjectImagePrompt, clip=clip, clip_vision=clip_vision, weights=w2, image=img,
                    text="a photo on the beach", labels="dog")[0]
    plain = clip.encode_from_tokens(clip.tokenize("a photo on the beach, the dog is sks"), return_pooled=True)[0]
    assert cond[0][0].shape == plain.shape
    assert not torch.allclose(cond[0][0], plain)
    # the trained model samples with location + adapters
    m = with_location(run_node(sdn.SubjectAdapter, model=model2, weights=w2, clip_vision=clip_vision, image=img)[0])
    out = sample(m, cond, models.random_conditioning("sd15", seed=9), steps=1)
    assert torch.isfinite(out).all()


def test_image_prompt_needs_trained_weights(clip, clip_vision, zero_weights):
    with pytest.raises(InputError, match=r"input 'weights'.*TRAINED"):
        run_node(sdn.SubjectImagePrompt, clip=clip, clip_vision=clip_vision, weights=zero_weights,
                 image=torch.rand(1, 64, 64, 3), text="a photo", labels="dog")


def test_trainer_bad_inputs(expanded, clip, vae, clip_vision, zero_weights):
    ex = training_examples()[0]
    empty = st.Example(ex.image, torch.zeros(1, 64, 64), "a photo", ["dog"])
    with pytest.raises(InputError, match=r"input 'masks'.*empty mask"):
        st.SubjectTrainer(expanded, clip, vae, clip_vision, zero_weights, [empty], device=torch.device("cpu"))
    with pytest.raises(InputError, match=r"input 'labels'"):
        st.SubjectTrainer(expanded, clip, vae, clip_vision, zero_weights,
                          [st.Example(ex.image, ex.masks, "a photo", ["dog"])], device=torch.device("cpu"))


# ------------------------------------------------------------------------------------------ parent unchanged
def test_parent_model_unchanged(tiny_sd15, expanded, zero_weights, clip_vision):
    pos, neg = conds(3)
    before = sample(tiny_sd15, pos, neg, steps=1)
    opts_before = repr(sorted(tiny_sd15.model_options.get("transformer_options", {}).keys()))
    exp2 = run_node(sdn.ExpandInputChannels, model=tiny_sd15)[0]
    m = with_location(exp2)
    m = run_node(sdn.SubjectAdapter, model=m, weights=zero_weights, clip_vision=clip_vision,
                 image=torch.rand(1, 64, 64, 3))[0]
    sample(m, pos, neg, steps=1)
    after = sample(tiny_sd15, pos, neg, steps=1)
    assert torch.equal(before, after)
    assert tiny_sd15.object_patches == {} and not tiny_sd15.wrappers.get("apply_model")
    assert repr(sorted(tiny_sd15.model_options.get("transformer_options", {}).keys())) == opts_before
    assert tiny_sd15.model.diffusion_model.input_blocks[0][0].weight.shape[1] == 4
    # the expanded parent keeps its own "no location" (all-zero) channel; the placed location lives on the clone
    assert float(loc.find_location(exp2).channel.abs().sum()) == 0.0
    assert loc.find_location(m) is not loc.find_location(exp2) and float(loc.find_location(m).channel.max()) == 1.0


# ------------------------------------------------------------------------------------------------- workflow
def object_info():
    import nodes

    out = {}
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        try:
            inputs = cls.INPUT_TYPES()
        except Exception:
            continue
        out[name] = {"input": inputs, "input_order": {k: list(v.keys()) for k, v in inputs.items()}}
    for name, cls in sdn.NODE_CLASS_MAPPINGS.items():
        inputs = cls.INPUT_TYPES()
        out[name] = {"input": inputs, "input_order": {k: list(v.keys()) for k, v in inputs.items()}}
    return out


def test_example_workflow_converts_and_runs_without_trained_weights(tiny_sd15, clip):
    from scripts import workflow as wf

    ui = json.loads((REPO / "example_workflows" / "subject_diffusion.json").read_text())
    api = wf.ui_to_api(ui, object_info())
    types = {v["class_type"] for v in api.values()}
    assert {"CheckpointLoaderSimple", "PersonalizeSubjectDiffusionExpandInputChannels",
            "PersonalizeSubjectDiffusionLocationMaskConcat", "KSampler"} <= types
    ck = [v for v in api.values() if v["class_type"] == "CheckpointLoaderSimple"][0]
    assert ck["inputs"]["ckpt_name"] == "personalize-random-sd15.safetensors"
    # the chain checkpoint -> expand -> (adapter, bypassed until trained) -> location -> KSampler
    ks = [v for v in api.values() if v["class_type"] == "KSampler"][0]
    src = api[ks["inputs"]["model"][0]]
    assert src["class_type"] == "PersonalizeSubjectDiffusionLocationMaskConcat"
    assert api[src["inputs"]["model"][0]]["class_type"] == "PersonalizeSubjectDiffusionExpandInputChannels"
    # run the Subject-Diffusion part of the prompt on the tiny model with the workflow's own widget values
    exp = run_node(sdn.ExpandInputChannels, model=tiny_sd15)[0]
    el = [v for v in api.values() if v["class_type"] == "EmptyLatentImage"][0]["inputs"]
    lat = {"samples": torch.zeros(1, 4, el["height"] // 8, el["width"] // 8)}
    li = src["inputs"]
    m = run_node(sdn.LocationMaskConcat, model=exp, latent=lat, boxes=li["boxes"], uncond_mask=li["uncond_mask"])[0]
    assert loc.find_location(m).channel.shape[-2:] == lat["samples"].shape[-2:]
    out = sample(m, *conds(), steps=1)       # sampled at 8x8: the channel is resized (nearest) to the call's grid
    assert torch.isfinite(out).all()


def test_cli_trains_and_saves_loadable_weights(tmp_path):
    from scripts import train_subject_diffusion as cli

    out = tmp_path / "cli.safetensors"
    assert cli.main(["--random-tiny", "--steps", "1", "--warmup", "0", "--hidden", "64", "--out", str(out)]) == 0
    w = ad.load_weights(str(out))
    assert w.trained and w.steps == 1 and w.unet["input_blocks.0.0.weight"].shape[1] == 5


def test_expanding_again_while_an_expanded_clone_is_loaded(tiny_sd15):
    """ComfyUI installs a clone's object patches into the shared model on load and leaves them there after sampling;
    a second prompt expanding the (unexpanded) parent must still work, and expanding an expanded model must not."""
    import comfy.model_management as mm

    from personalize.nodes import introspect

    exp = run_node(sdn.ExpandInputChannels, model=tiny_sd15)[0]

    mm.load_models_gpu([exp])  # the expanded conv is now installed in the shared BaseModel
    assert introspect.base_model(tiny_sd15).diffusion_model.input_blocks[0][0].weight.shape[1] == 5
    again = run_node(sdn.ExpandInputChannels, model=tiny_sd15)[0]
    assert again.object_patches[loc.CONV_IN].weight.shape[1] == 5
    assert introspect.latent_channels(tiny_sd15) == 4 and introspect.latent_channels(again) == 5
    with pytest.raises(InputError, match="not yet expanded.*got 5 input channels"):
        run_node(sdn.ExpandInputChannels, model=again)
    mm.load_models_gpu([tiny_sd15])  # back to the plain conv for the tests that follow
    assert introspect.base_model(tiny_sd15).diffusion_model.input_blocks[0][0].weight.shape[1] == 4


# ------------------------------------------------------------------------------- the training engine's guarantees
def fresh_trainer(expanded, clip, vae, clip_vision, zero_weights, **kw):
    return st.SubjectTrainer(expanded, clip, vae, clip_vision, zero_weights, training_examples(), lr=2e-3, warmup=2,
                             seed=0, device=torch.device("cpu"), **kw)


def test_trainer_killed_and_cancelled_runs_resume_to_the_same_weights(expanded, clip, vae, clip_vision, zero_weights,
                                                                      tmp_path):
    import comfy.model_management as mm

    full = fresh_trainer(expanded, clip, vae, clip_vision, zero_weights)
    log = full.train(4)
    ref = full.result().state_dict()

    class Killed(Exception):
        pass

    def kill(step, r):
        if step + 1 == 3:
            raise Killed()

    def cancel(step, r):
        if step + 1 == 3:
            mm.interrupt_current_processing(True)

    for name, hook, exc, resumed_from in (("killed", kill, Killed, 2),
                                          ("cancelled", cancel, mm.InterruptProcessingException, 3)):
        ck = str(tmp_path / f"{name}.resume")
        with torch.inference_mode(), pytest.raises(exc):
            fresh_trainer(expanded, clip, vae, clip_vision, zero_weights).train(
                4, hook, checkpoint=ck, checkpoint_every=2, check_interrupt=mm.throw_exception_if_processing_interrupted)
        mm.interrupt_current_processing(False)
        again = fresh_trainer(expanded, clip, vae, clip_vision, zero_weights)
        with torch.inference_mode():
            log2 = again.train(4, checkpoint=ck, checkpoint_every=2)
        assert again.last_run.resumed_from == resumed_from, name
        assert log2 == log, name
        got = again.result().state_dict()
        for k, v in ref.items():
            assert torch.equal(v, got[k]), (name, k)


def test_trainer_nan_loss_stops_and_keeps_the_last_good_checkpoint(expanded, clip, vae, clip_vision, zero_weights,
                                                                   tmp_path):
    from personalize.nodes.training_engine import TrainingError
    from personalize.nodes.weights_io import load

    tr = fresh_trainer(expanded, clip, vae, clip_vision, zero_weights)
    real = tr.batch

    def poisoned(step, part, parts):
        b = real(step, part, parts)
        if step >= 2:
            i, sigma, noise, dt, dm = b["items"][0]
            b["items"][0] = (i, sigma, noise * float("nan"), dt, dm)
        return b

    tr.batch = poisoned
    ck = str(tmp_path / "nan.resume")
    with pytest.raises(TrainingError, match=r"loss became nan at step 3.*last good checkpoint \(step 2\)"):
        tr.train(5, checkpoint=ck, checkpoint_every=1)
    sd, meta = load(ck)
    assert meta["personalize.step"] == "2"
    assert all(bool(torch.isfinite(t).all()) for t in sd.values() if t.is_floating_point())
    assert not list(tmp_path.glob(".*partial"))


def test_trainer_torchrun_two_processes_match_one_process_with_doubled_batch(tmp_path):
    """2 processes x 1 example (gloo) against 1 process with the same global batch of 2 examples:

    - as 2 accumulated micro-batches of 1: the same per-example forwards and backwards, gradients averaged as
      (a + b) / 2 by DDP's all-reduce and by the engine's accumulation alike: equal to float32 rounding;
    - as one batch of 2 (one backward over both examples' graphs): autograd sums a weight's gradient contributions
      in another order, and AdamW's per-element normalisation turns that rounding into differences of a fraction of
      the learning rate in the elements whose gradient sits at the rounding floor (see the DreamBooth test): the
      relative L2 difference of the trained change is asserted < 1e-2 and 20x below a run on other data."""
    import subprocess
    import sys

    from scripts.train_subject_diffusion import tiny_setup
    from test_dreambooth import subprocess_env

    from personalize.nodes.weights_io import load

    steps = 3
    args = ["--random-tiny", "--steps", str(steps), "--hidden", "64", "--warmup", "0", "--lr", "1e-3",
            "--checkpoint-every", "0", "--cpu"]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "scripts.train_subject_diffusion", *args, "--batch-size", "1",
                             "--out", str(tmp_path / "ddp.safetensors")], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    model, clip_, vae_, cv, examples = tiny_setup(tmp_path)
    width, tokens, embed = ad.vision_dims(cv)
    weights = ad.init_weights(model, width, tokens, embed, hidden=64, seed=0)

    def run(batch_size, accumulation=1):
        tr = st.SubjectTrainer(model, clip_, vae_, cv, weights, examples, lr=1e-3, warmup=0, seed=0,
                               batch_size=batch_size, grad_accumulation=accumulation, device=torch.device("cpu"))
        tr.train(steps, progress=False)
        return tr.result().state_dict()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child processes (OMP_NUM_THREADS=1): CPU kernels round by thread count
    try:
        one, acc, half = run(2), run(1, 2), run(1)
    finally:
        torch.set_num_threads(threads)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    ddp, _ = load(str(tmp_path / "ddp.safetensors"))
    assert set(ddp) == set(one)
    start = weights.state_dict()
    keys = [k for k in one if k in start and one[k].is_floating_point()]

    def rel(x):  # relative L2 difference of the trained change
        num = sum(float((x[k].double() - one[k].double()).pow(2).sum()) for k in keys)
        den = sum(float((one[k].double() - start[k].double()).pow(2).sum()) for k in keys)
        return (num / den) ** 0.5

    moved = max(float((one[k] - start[k]).abs().max()) for k in keys)
    d_acc = max(float((acc[k] - ddp[k]).abs().max()) for k in one)
    print(f"subject-diffusion ddp vs accumulation: max {d_acc:.3g}; ddp vs batch 2: rel L2 {rel(ddp):.3g}; "
          f"batch 1 vs batch 2: rel L2 {rel(half):.3g}; moved {moved:.3g}")
    assert moved > 1e-3
    assert d_acc <= 1e-6 * moved, (d_acc, moved)
    assert rel(ddp) < 1e-2 and rel(half) > 20 * rel(ddp), (rel(ddp), rel(half))
