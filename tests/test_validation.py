"""Issue 15: every registered node refuses bad input clearly, before any heavy work.

The walking test reads every pack node's INPUT_TYPES from the pack's NODE_CLASS_MAPPINGS (a new node is covered
automatically) and gives each FLOAT input NaN, +inf and a value below its minimum, each INT input a value below its
minimum, and each IMAGE / MASK / LATENT input a tensor holding a NaN; every case must raise the pack's InputError
naming that input, in under a second, without loading a model for sampling, encoding with a VAE or sampling.
The other inputs get valid values built from tiny models and fixtures.
"""
from __future__ import annotations

import json
import math
import time

import pytest
import torch

import personalize
from personalize.nodes import validation
from personalize.nodes.errors import InputError
from scripts import models

TINY_VISION = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": 32, "image_size": 224,
               "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-5,
               "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3,
               "num_hidden_layers": 2, "patch_size": 56, "projection_dim": 24, "torch_dtype": "float32"}


# ------------------------------------------------------------------------------------------------ valid values
@pytest.fixture(scope="module")
def valid_objects(tiny_sd15, tmp_path_factory):
    """One valid value per non-widget input type of the pack's nodes."""
    import comfy.clip_vision

    from personalize.nodes import adapters as ad
    from personalize.nodes import pick_and_draw as G
    from personalize.nodes import location as loc
    from personalize.nodes import sam as sam_lib
    from personalize.nodes.mask_sources import SAMMaskSource
    from personalize.nodes.reference_attention import ReferenceSet

    cfg = tmp_path_factory.mktemp("clipvision") / "config.json"
    cfg.write_text(json.dumps(TINY_VISION))
    cv = comfy.clip_vision.ClipVisionModel(str(cfg))
    models.init_random_(cv.model, seed=3)
    with torch.inference_mode(False):
        sam = sam_lib.build(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                            encoder_global_attn_indexes=[1])
    expanded = loc.expand_model(tiny_sd15, 1)
    w, t, e = ad.vision_dims(cv)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    return {
        "MODEL": tiny_sd15,
        "CLIP": models.build_clip(seed=0),
        "VAE": models.build_vae(seed=0),
        "CLIP_VISION": cv,
        "SAM_MODEL": sam,
        "IMAGE": torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0)),
        "MASK": mask,
        "LATENT": {"samples": torch.zeros(1, 4, 8, 8)},
        "CONDITIONING": models.random_conditioning("sd15"),
        "BOOTPIG_REFERENCE": ReferenceSet(latents=torch.zeros(1, 4, 8, 8), white=torch.zeros(4), encoder=tiny_sd15,
                                          family="sd15", context=None, seed=0),
        "PICK_AND_DRAW_REFERENCE": G.Reference(latent=torch.zeros(1, 4, 8, 8), mask=None, family="sd15"),
        "SUBJECT_DIFFUSION_WEIGHTS": ad.init_weights(expanded, w, t, e, hidden=64, seed=0),
        "PERSONALIZE_MASK_SOURCE": SAMMaskSource(sam),
    }


def widget_default(kind, opts):
    if isinstance(kind, (list, tuple)):
        return opts.get("default", kind[0] if kind else "")
    if kind == "STRING":
        return opts.get("default", "")
    if kind == "BOOLEAN":
        return opts.get("default", False)
    if kind in ("INT", "FLOAT"):
        v = opts.get("default", opts.get("min", 0))
        return int(v) if kind == "INT" else float(v)
    return None


def valid_inputs(cls, objects) -> dict:
    out = {}
    for name, (kind, opts) in validation.declared_inputs(cls).items():
        v = widget_default(kind, opts)
        if v is None:
            assert kind in objects, (f"{cls.__name__}.{name}: no valid value for input type {kind}; add one to "
                                     "valid_objects in tests/test_validation.py")
            v = objects[kind]
        out[name] = v
    return out


def nan_tensor(kind, like):
    if kind == "LATENT":
        s = like["samples"].clone()
        s.view(-1)[0] = float("nan")
        return {"samples": s}
    t = like.clone()
    t.view(-1)[t.numel() // 2] = float("nan")
    return t


def bad_cases():
    """(node id, input, label, bad value or a builder of it) for every registered node, from its INPUT_TYPES."""
    cases = []
    for node_id, cls in sorted(personalize.NODE_CLASS_MAPPINGS.items()):
        for name, (kind, opts) in validation.declared_inputs(cls).items():
            if kind == "FLOAT":
                cases += [(node_id, name, "nan", float("nan")), (node_id, name, "+inf", float("inf"))]
                if opts.get("min") is not None:
                    lo = float(opts["min"])
                    cases.append((node_id, name, "below_min", lo - max(1.0, abs(lo))))
            elif kind == "INT" and opts.get("min") is not None:
                cases.append((node_id, name, "below_min", int(opts["min"]) - 1))
            elif kind in ("IMAGE", "MASK", "LATENT"):
                cases.append((node_id, name, "nan_tensor", kind))
    return cases


CASES = bad_cases()


def test_the_walk_covers_every_node_and_every_numeric_and_tensor_input():
    covered = {(n, i) for n, i, _, _ in CASES}
    for node_id, cls in personalize.NODE_CLASS_MAPPINGS.items():
        assert validation.is_validated(cls), f"{node_id} is not wrapped by the validation layer"
        for name, (kind, opts) in validation.declared_inputs(cls).items():
            if kind in ("FLOAT", "IMAGE", "MASK", "LATENT") or (kind == "INT" and "min" in opts):
                assert (node_id, name) in covered
    assert len(CASES) > 60


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Model loading, VAE encoding and sampling fail the test if a refused input reaches them."""
    import comfy.model_management
    import comfy.samplers
    import comfy.sd

    def forbidden(*a, **k):
        raise AssertionError("heavy work started before the bad input was refused")

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", forbidden)
    monkeypatch.setattr(comfy.samplers.CFGGuider, "outer_sample", forbidden)
    monkeypatch.setattr(comfy.sd.VAE, "encode", forbidden)


@pytest.mark.parametrize("node_id,name,label,bad", CASES, ids=[f"{n}-{i}-{lab}" for n, i, lab, _ in CASES])
def test_every_node_refuses_bad_numbers_and_tensors(node_id, name, label, bad, valid_objects, no_heavy_work,
                                                    tmp_path, monkeypatch):
    import folder_paths

    for folder in ("loras", "subject_diffusion"):  # trainers must not write anything anywhere
        monkeypatch.setitem(folder_paths.folder_names_and_paths, folder, ([str(tmp_path)], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    cls = personalize.NODE_CLASS_MAPPINGS[node_id]
    inputs = valid_inputs(cls, valid_objects)
    validation.check_inputs(cls, inputs)  # the valid values pass the layer: the bad one is what is refused
    inputs[name] = nan_tensor(bad, inputs[name]) if label == "nan_tensor" else bad
    t0 = time.perf_counter()
    with pytest.raises(InputError) as err, torch.inference_mode():
        getattr(cls(), cls.FUNCTION)(**inputs)
    elapsed = time.perf_counter() - t0
    assert err.value.input_name == name, str(err.value)
    assert f"input '{name}'" in str(err.value)
    assert elapsed < 1.0, f"refused after {elapsed:.2f}s"
    assert not any(tmp_path.rglob("*")), "a refused run wrote a file"


# ------------------------------------------------------------------------------------------------ the layer itself
def test_numbers_are_checked_against_the_declaration():
    opts = {"min": 0.0, "max": 2.0}
    assert validation.check_float(1, "strength", opts) == 1.0
    for bad, text in [(float("nan"), "got nan"), (float("-inf"), "got -inf"), (-1.0, "got -1.0"), (2.5, "got 2.5"),
                      ("1", "got str"), (True, "got bool")]:
        with pytest.raises(InputError, match=text) as e:
            validation.check_float(bad, "strength", opts)
        assert "input 'strength'" in str(e.value) and "from 0.0 to 2.0" in str(e.value)
    assert validation.check_int(3.0, "steps", {"min": 1}) == 3
    for bad in (0, 2.5, float("nan"), False):
        with pytest.raises(InputError, match="input 'steps': expected an integer >= 1"):
            validation.check_int(bad, "steps", {"min": 1})


def test_images_and_masks_must_be_finite_and_in_unit_range():
    ok = torch.rand(1, 8, 8, 3)
    validation.check_image(ok, "images")
    validation.check_image([ok, ok * 1.1], "images")  # resampling overshoot is tolerated
    with pytest.raises(InputError, match=r"input 'images'.*finite.*1 NaN"):
        bad = ok.clone()
        bad[0, 0, 0, 0] = math.nan
        validation.check_image(bad, "images")
    with pytest.raises(InputError, match="divide by 255"):
        validation.check_image(ok * 255, "images")
    with pytest.raises(InputError, match=r"\(x \+ 1\) / 2"):
        validation.check_image(ok * 2 - 1, "images")
    with pytest.raises(InputError, match="input 'mask'.*infinite"):
        validation.check_mask(torch.full((1, 4, 4), math.inf), "mask")
    with pytest.raises(InputError, match="input 'latent'.*a LATENT"):
        validation.check_latent({"samples": torch.full((1, 4, 2, 2), math.nan)}, "latent")
    with pytest.raises(InputError, match="input 'positive'.*CONDITIONING"):
        validation.check_conditioning([[torch.full((1, 77, 8), math.nan), {}]], "positive")


def test_the_decorator_reads_the_declaration_and_wraps_once():
    class Node:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"x": ("FLOAT", {"min": -1.0, "max": 1.0}), "n": ("INT", {"min": 2})},
                    "optional": {"image": ("IMAGE",)}}

        FUNCTION = "run"

        def run(self, x, n=2, image=None, **extra):
            return x, n, extra

    validation.validated(validation.validated(Node))
    assert validation.is_validated(Node)
    assert Node().run(0.5, n=3.0, other=1) == (0.5, 3, {"other": 1})  # an integral float arrives as an int
    with pytest.raises(InputError, match="input 'x'.*from -1.0 to 1.0, got 1.5"):
        Node().run(1.5)
    with pytest.raises(InputError, match="input 'n'.*>= 2, got 1"):
        Node().run(0.0, 1)
    with pytest.raises(InputError, match="input 'image'"):
        Node().run(0.0, image=torch.full((1, 2, 2, 3), math.inf))


def test_context_mismatch_finds_the_first_differing_token():
    g = torch.Generator().manual_seed(0)
    want = torch.randn(1, 5, 16, generator=g)
    got = torch.cat([want, torch.randn(1, 72, 16, generator=g)], dim=1)  # same start, any padding after it
    assert validation.context_mismatch(want, got) is None
    assert validation.context_mismatch(want, got * 1.01) is None  # a slightly different encoder (small LoRA)
    other = got.clone()
    other[0, 3] = torch.randn(16, generator=g)
    assert validation.context_mismatch(want, other) == 3
    assert validation.context_mismatch(want, got[:, :4]) == 4
    assert validation.context_mismatch(want, torch.zeros(1, 77, 8)) == 0
