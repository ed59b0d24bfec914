"""Pick-and-Draw guidance on tiny seeded-random models with real ComfyUI sampling (no stand-ins for comfy.*)."""
from __future__ import annotations

import pytest
import torch

from helpers import convert_example, run_node, sample
from personalize import pick_and_draw_nodes as P
from personalize.nodes import pick_and_draw as G
from personalize.nodes.errors import InputError
from personalize.nodes.introspect import attention_module
from scripts.models import build_clip, build_model, build_vae

PROMPT = "a photo of a sks dog on the beach"


@pytest.fixture(scope="module")
def clip():
    return build_clip(seed=0)


@pytest.fixture(scope="module")
def conds(clip):
    import nodes

    with torch.inference_mode():
        pos = nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
        neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    return pos, neg


@pytest.fixture(scope="module")
def reference(tiny_sd15):
    vae = build_vae(seed=0)
    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, 64, 64, 3, generator=g)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 20:52] = 1.0
    (ref,) = run_node(P.PickAndDrawReference, model=tiny_sd15, vae=vae, image=image, mask=mask, resolution=64)
    return ref


def appearance(model, reference, clip, **kw):
    args = dict(model=model, reference=reference, clip=clip, prompt=PROMPT, subject_word="sks", weight=1.0,
                start_percent=0.0, end_percent=0.5, iterations=1, step_size=0.5, reference_noise="renoise")
    args.update(kw)
    return run_node(P.AppearancePickingGuidance, **args)[0]


def layout(model, clip, **kw):
    args = dict(model=model, clip=clip, prompt=PROMPT, subject_word="sks", class_word="dog", weight=1.0,
                start_percent=0.0, end_percent=0.5, step_size=0.5, layers="all")
    args.update(kw)
    return run_node(P.LayoutDrawingGuidance, **args)[0]


@pytest.fixture(scope="module")
def plain(tiny_sd15, conds):
    return {1: sample(tiny_sd15, *conds, steps=2, batch=1)}


def test_weight_zero_and_empty_range_equal_plain_sampling(tiny_sd15, conds, clip, reference, plain):
    off = layout(appearance(tiny_sd15, reference, clip, weight=0.0), clip, weight=0.0)
    assert torch.equal(sample(off, *conds, steps=2), plain[1])
    empty = layout(appearance(tiny_sd15, reference, clip, start_percent=0.4, end_percent=0.4), clip,
                   start_percent=0.0, end_percent=0.0)
    assert torch.equal(sample(empty, *conds, steps=2), plain[1])
    assert G.LAST_RUN_LOG == []  # nothing ran: no guided step at all


@pytest.mark.parametrize("which", ["appearance", "layout"])
def test_a_guided_step_lowers_its_loss(tiny_sd15, conds, clip, reference, which):
    if which == "appearance":
        m = appearance(tiny_sd15, reference, clip, iterations=2, step_size=2.0, step_size_schedule="constant")
    else:
        m = layout(tiny_sd15, clip, iterations=2, step_size=2.0, step_size_schedule="constant")
    sample(m, *conds, steps=1)
    (entry,) = G.LAST_RUN_LOG
    losses = [it[which] for it in entry["iterations"]]
    # iteration k's loss is measured at the latent after k updates (same step, same targets)
    assert losses[1] < losses[0], losses
    assert entry["backward_passes"] == 2


def test_both_losses_share_one_backward_and_guide_only_conditional_rows(tiny_sd15, conds, clip, reference):
    m = layout(appearance(tiny_sd15, reference, clip, iterations=2, step_size=1.0, step_size_schedule="constant"),
               clip, step_size=1.0, step_size_schedule="constant")
    sample(m, *conds, steps=1, batch=2, cfg=5.0)
    (entry,) = G.LAST_RUN_LOG
    assert entry["backward_passes"] == 2  # one per iteration over appearance + layout, not one per loss
    assert all(set(it) == {"appearance", "layout"} for it in entry["iterations"])
    assert entry["recorded_rows"] == 2  # the two conditional rows of the CFG batch of 4, not the uncond ones
    total = [it["appearance"] + it["layout"] for it in entry["iterations"]]
    assert total[1] < total[0], total


def test_recorded_maps_match_float64_softmax(tiny_sd15, conds):
    import comfy.sampler_helpers

    bm = tiny_sd15.model
    keys = G.parse_layers(tiny_sd15, "input.1, middle, output.6")
    import comfy.samplers

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * 3.0
    cond = comfy.samplers.process_conds(bm, x, {"positive": comfy.sampler_helpers.convert_cond(conds[0])},
                                        torch.device("cpu"))["positive"]
    t = torch.tensor([3.0])
    old = getattr(bm, "current_patcher", None)
    bm.current_patcher = tiny_sd15  # what ComfyUI sets while sampling
    try:
        with torch.inference_mode():
            rec = G.record(bm, cond, x, t, {}, keys, want_feats=keys)
    finally:
        bm.current_patcher = old
    assert set(rec.maps) == set(keys)  # stopped after output.6, nothing missed
    ctx = conds[0][0][0][0].double()
    for k in keys:
        attn2 = attention_module(tiny_sd15, k, "attn2")
        heads = attn2.heads
        n = rec.feats[k][0].double()
        q = n @ attn2.to_q.weight.double().T
        kk = ctx @ attn2.to_k.weight.double().T
        d = q.shape[-1] // heads
        qh = q.view(-1, heads, d).transpose(0, 1)
        kh = kk.view(-1, heads, d).transpose(0, 1)
        ref = torch.softmax(qh @ kh.transpose(-1, -2) / d ** 0.5, dim=-1).mean(0)
        got = rec.maps[k][0].double()
        assert got.shape == ref.shape == (rec.grids[k][0] * rec.grids[k][1], 77)
        assert torch.allclose(got, ref, atol=1e-5), (k, float((got - ref).abs().max()))


def test_batch2_with_cfg_matches_batch1_rows_and_parent_is_untouched(tiny_sd15, conds, clip, reference, plain):
    before = dict(tiny_sd15.model_options.get("transformer_options", {}))
    m = layout(appearance(tiny_sd15, reference, clip, reference_noise="ddim_inversion", step_size=0.2), clip,
               step_size=0.2)
    one = sample(m, *conds, steps=2, batch=1, cfg=5.0)
    two = sample(m, *conds, steps=2, batch=2, cfg=5.0)
    assert torch.isfinite(two).all()
    assert not torch.allclose(one, plain[1])  # the guidance did something
    # per-row losses are summed: row 0 of the batch-2 run is the batch-1 run (same noise row)
    scale = float(one.abs().max())
    assert torch.allclose(two[:1], one, atol=1e-5 * scale, rtol=1e-4), (float((two[:1] - one).abs().max()), scale)
    # the parent: no patch, no wrapper, same samples before and after the guided runs
    assert G.SPEC_KEY not in tiny_sd15.model_options.get("transformer_options", {})
    assert dict(tiny_sd15.model_options.get("transformer_options", {})) == before
    assert not tiny_sd15.get_wrappers("predict_noise", G.WRAPPER_KEY)
    assert torch.equal(sample(tiny_sd15, *conds, steps=2, batch=1), plain[1])


def test_gradients_flow_with_weights_made_in_inference_mode(conds, clip, reference):
    with torch.inference_mode():  # as ComfyUI's checkpoint loader makes them
        model = build_model("sd15", tiny=True, seed=0)
    params = list(model.model.diffusion_model.parameters())
    assert all(p.is_inference() for p in params)
    m = appearance(model, reference, clip, iterations=2, step_size=2.0, step_size_schedule="constant")
    sample(m, *conds, steps=1)
    (entry,) = G.LAST_RUN_LOG
    losses = [it["appearance"] for it in entry["iterations"]]
    assert losses[1] < losses[0]
    assert entry["per_op_alias"] is False  # the UNet's parameters were aliased; no per-op fallback was needed
    after = list(model.model.diffusion_model.parameters())
    assert len(after) == len(params) and all(a is b and a.is_inference() for a, b in zip(after, params))


def test_aliases_share_storage_and_the_per_op_fallback_differentiates():
    with torch.inference_mode():
        lin = torch.nn.Linear(3, 2)
        ctx = torch.randn(1, 2)
    x = torch.randn(1, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="nference"):
        (lin(x) * ctx).sum().backward()
    w0 = lin.weight
    with G.ParamAlias(lin):
        assert not lin.weight.is_inference() and lin.weight.data_ptr() == w0.data_ptr()
        with G.InferenceAlias():  # ctx is not a parameter: the per-op mode aliases it
            y = (lin(x) * ctx).sum()
    assert lin.weight is w0
    (g,) = torch.autograd.grad(y, [x])
    assert torch.allclose(g, ctx @ w0)


def test_chained_nodes_keep_earlier_terms_and_patch_values(tiny_sd15, clip, reference):
    a = appearance(tiny_sd15, reference, clip)
    b = layout(a, clip)
    sa, sb = G.find_spec(a), G.find_spec(b)
    assert len(sa.terms) == 1 and len(sb.terms) == 2 and sb is not sa and sb.terms[0] is sa.terms[0]
    assert len(b.get_wrappers("predict_noise", G.WRAPPER_KEY)) == 1  # the engine wraps once


def test_subject_word_positions_follow_the_tokenizer(clip):
    pos, _ = G.word_positions(clip, "a photo of a sks dog, a dog", "dog")
    assert pos == (6, 9)  # start token at 0; both occurrences
    with pytest.raises(InputError, match="subject_word") as e:
        G.word_positions(clip, "a photo of a dog", "cat")
    assert e.value.input_name == "subject_word"


def test_bad_inputs_name_the_input(tiny_sd15, clip, reference):
    with pytest.raises(InputError) as e:
        appearance(tiny_sd15, reference, clip, subject_word="cat")
    assert e.value.input_name == "subject_word" and "'cat'" in str(e.value)
    with pytest.raises(InputError) as e:
        layout(tiny_sd15, clip, subject_word="dogs")
    assert e.value.input_name == "subject_word"
    with pytest.raises(InputError) as e:
        run_node(P.PickAndDrawReference, model=tiny_sd15, vae=build_vae(0), image=torch.rand(1, 64, 64, 3),
                 mask=torch.zeros(1, 64, 64), resolution=64)
    assert e.value.input_name == "mask" and "empty" in str(e.value)
    xl_ref = G.Reference(latent=reference.latent, mask=None, family="sdxl")  # as the encoder tags an SDXL one
    with pytest.raises(InputError) as e:
        appearance(tiny_sd15, xl_ref, clip)
    assert e.value.input_name == "reference" and "SDXL" in str(e.value)
    with pytest.raises(InputError) as e:
        layout(tiny_sd15, clip, class_word=" ")
    assert e.value.input_name == "class_word"
    with pytest.raises(InputError) as e:
        appearance(tiny_sd15, reference, clip, layers="output.0")
    assert e.value.input_name == "layers"
    with pytest.raises(InputError) as e:
        appearance(tiny_sd15, reference, clip, start_percent=0.9, end_percent=0.1)
    assert e.value.input_name == "start_percent"


@pytest.mark.parametrize("name", ["pick_and_draw.json", "pick_and_draw_bootpig.json"])
def test_example_workflows_convert_with_the_defaults_and_build(name, pack, tiny_sd15, clip, reference):
    """The example workflows convert (object_info from the real node classes, as the server builds it); the guidance
    nodes ship their defaults; their widget values build patched models on the tiny model."""
    api = convert_example(name)
    by_type = {v["class_type"]: (k, v["inputs"]) for k, v in api.items()}
    assert by_type["CheckpointLoaderSimple"][1]["ckpt_name"] == "personalize-random-sd15.safetensors"
    assert api[by_type["PersonalizePickAndDrawReference"][1]["image"][0]]["inputs"]["image"] == "example.png"
    ks = by_type["KSampler"][1]
    positive_text = api[ks["positive"][0]]["inputs"]["text"]
    chain = {"pick_and_draw.json": ["PersonalizeAppearancePickingGuidance"],
             "pick_and_draw_bootpig.json": ["PersonalizeLayoutDrawingGuidance", "PersonalizeAppearancePickingGuidance",
                                            "PersonalizeBootPIGRSAPatch"]}[name]
    src = ks["model"][0]
    for t in chain:  # KSampler <- layout <- appearance <- RSA <- checkpoint
        assert api[src]["class_type"] == t
        src = api[src]["inputs"]["model"][0]
    assert api[src]["class_type"] == "CheckpointLoaderSimple"
    model = tiny_sd15
    for t in ("PersonalizeAppearancePickingGuidance", "PersonalizeLayoutDrawingGuidance"):
        if t not in by_type:
            continue
        cls = pack.NODE_CLASS_MAPPINGS[t]
        inputs = by_type[t][1]
        assert inputs["prompt"] == positive_text  # the guidance finds the word in the sampler's prompt
        for group in cls.INPUT_TYPES().values():
            for k, (typ, opts) in group.items():
                if "default" in opts and k not in ("prompt", "subject_word", "class_word"):
                    assert inputs[k] == opts["default"], (t, k)
        widgets = {k: v for k, v in inputs.items() if not isinstance(v, list)}
        extra = {"reference": reference} if "Appearance" in t else {}
        model = run_node(cls, model=model, clip=clip, **extra, **widgets)[0]
    assert len(G.find_spec(model).terms) == (2 if "bootpig" in name else 1)


def test_sdxl_both_losses_on_one_step(tiny_sdxl):
    """SDXL (70 blocks, pooled/size conditioning): the engine runs both terms and the guided step lowers their sum."""
    from scripts.models import random_conditioning

    pos, neg = random_conditioning("sdxl", seed=1), random_conditioning("sdxl", seed=2)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(8, 8)
    mask[2:6, 2:6] = 1
    ref = G.Reference(latent=latent, mask=mask, family="sdxl")
    rng = G.StepRange.from_percent(tiny_sdxl, 0.0, 0.5)
    assert [(k.name, k.id) for k in G.parse_layers(tiny_sdxl, "decoder_mid")] == [
        ("output", 3), ("output", 3), ("output", 4), ("output", 4), ("output", 5), ("output", 5)]
    early = G.parse_layers(tiny_sdxl, "input.4, input.5")  # the guided forward stops after the 4th of 70 blocks
    app = G.AppearanceTerm(weight=1.0, steps=rng, layers=early, positions=(3,),
                           tau=0.5, step_size=1.0, schedule="constant", iterations=2, reference=ref,
                           reference_noise="renoise", seed=0)
    lay = G.LayoutTerm(weight=1.0, steps=rng, layers=early, positions=(3,),
                       template_positions=(3,), template_context=random_conditioning("sdxl", seed=3)[0][0],
                       smoothing_sigma=0.5, step_size=1.0, schedule="constant")
    m = G.add_term(G.add_term(tiny_sdxl, app), lay)
    out = sample(m, pos, neg, steps=1)
    (entry,) = G.LAST_RUN_LOG
    total = [it["appearance"] + it["layout"] for it in entry["iterations"]]
    assert torch.isfinite(out).all() and total[1] < total[0], total
