"""Issue 15: each bad input found by the hostile-user run, as its own regression test. Every one gives the pack's
InputError naming the input (or works as documented), before any heavy work, and leaves no file in any model or
output folder."""
from __future__ import annotations

import os
import pickle
import time

import pytest
import torch
from helpers import run_node, sample

from personalize import bootpig_nodes as B
from personalize import dreambooth_nodes as D
from personalize import pick_and_draw_nodes as P
from personalize import subject_diffusion_nodes as S
from personalize.nodes import pick_and_draw as G
from personalize.nodes import weights_io
from personalize.nodes.errors import InputError
from personalize.toyworld import model as tw_model
from scripts import models

import comfy.samplers  # noqa: E402,F401  (imported by the server before any node runs; not a cost of a refusal)

NAN, INF = float("nan"), float("inf")
PROMPT = "a photo of a sks dog on the beach"


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def vae():
    return models.build_vae(seed=0)


@pytest.fixture(scope="module")
def clip():
    return models.build_clip(seed=0)


@pytest.fixture(scope="module")
def photos():
    return torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(tiny_sd15, vae, photos):
    return run_node(B.BootPIGReferenceEncoder, model=tiny_sd15, vae=vae, images=photos[:1], resolution=64)[0]


@pytest.fixture(scope="module")
def toy():
    """The toy world's model (an SD1.5-family UNet of another size than the tiny SD1.5), random weights."""
    return tw_model.load_random(seed=0)


@pytest.fixture(scope="module")
def full_sd15():
    """A full-size SD1.5 UNet on the meta device: the real shape, no memory, no weights (it never runs here)."""
    import comfy.model_patcher

    mc = models.model_config("sd15", tiny=False)
    bm = mc.get_model({}, device=torch.device("meta"))
    return comfy.model_patcher.ModelPatcher(bm, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """Every model folder the pack writes or reads, and the output folder, pointed at an empty temporary folder."""
    import folder_paths

    roots = {}
    for name in ("loras", "bootpig", "subject_diffusion", "sams"):
        d = tmp_path / "models" / name
        d.mkdir(parents=True)
        roots[name] = d
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(d)], {".safetensors", ".pth", ".pt"}))
        folder_paths.filename_list_cache.pop(name, None)
    out = tmp_path / "output"
    monkeypatch.setattr(folder_paths, "output_directory", str(out))
    roots["output"] = out
    roots["root"] = tmp_path
    yield roots
    for name in ("loras", "bootpig", "subject_diffusion", "sams"):
        folder_paths.filename_list_cache.pop(name, None)


def written(folders, keep=()):
    """Files under the model and output folders, except the inputs the test put there itself."""
    return sorted(str(p.relative_to(folders["root"])) for p in folders["root"].rglob("*")
                  if p.is_file() and p.name not in keep)


def refused(input_name, fn, *args, match=None, **kwargs) -> InputError:
    t0 = time.perf_counter()
    with pytest.raises(InputError) as err, torch.inference_mode():
        fn(*args, **kwargs)
    assert time.perf_counter() - t0 < 1.0, "refused only after heavy work"
    assert err.value.input_name == input_name, str(err.value)
    assert f"input '{input_name}'" in str(err.value)
    if match:
        assert match in str(err.value), str(err.value)
    return err.value


def rsa(model, reference, **kw):
    return B.BootPIGRSAPatch().patch(model=model, reference=reference, **kw)


def appearance(model, clip, prompt=PROMPT, **kw):
    ref = G.Reference(latent=torch.zeros(1, 4, 8, 8), mask=None, family="sd15")
    args = dict(model=model, reference=ref, clip=clip, prompt=prompt, subject_word="sks", start_percent=0.0,
                end_percent=0.5, step_size=0.5, reference_noise="renoise")
    args.update(kw)
    return P.AppearancePickingGuidance().patch(**args)


def layout(model, clip, prompt=PROMPT, **kw):
    args = dict(model=model, clip=clip, prompt=prompt, subject_word="sks", class_word="dog", start_percent=0.0,
                end_percent=0.5, step_size=0.5)
    args.update(kw)
    return P.LayoutDrawingGuidance().patch(**args)


# ------------------------------------------------------------------------------------------------ the table's rows
@pytest.mark.parametrize("name", ["strength", "ref_scale"])
def test_rsa_strength_and_ref_scale_nan(tiny_sd15, reference, name):
    e = refused(name, rsa, tiny_sd15, reference, **{name: NAN})
    assert "finite number" in str(e) and "got nan" in str(e)


@pytest.mark.parametrize("node", ["appearance", "layout"])
def test_guidance_step_size_nan(tiny_sd15, clip, node):
    refused("step_size", appearance if node == "appearance" else layout, tiny_sd15, clip, step_size=NAN,
            match="got nan")


def test_values_below_the_minimum_through_a_link(tiny_sd15, reference, clip):
    """A primitive linked to the input skips the widget's min: the node enforces it itself."""
    refused("strength", rsa, tiny_sd15, reference, strength=-1.0, match="from 0.0 to 2.0, got -1.0")
    refused("step_size", appearance, tiny_sd15, clip, step_size=-5.0, match="from 0.0 to 1000.0, got -5.0")


def test_rsa_once_percent_nan(tiny_sd15, reference):
    refused("once_percent", rsa, tiny_sd15, reference, reference_features="once", once_percent=NAN,
            match="from 0.0 to 1.0, got nan")


def test_bootpig_reference_encoder_nan_images(tiny_sd15, vae, photos):
    bad = photos.clone()
    bad[0, 3, 3, 0] = NAN
    refused("images", B.BootPIGReferenceEncoder().encode, model=tiny_sd15, vae=vae, images=bad, resolution=64,
            match="1 NaN values")


def test_pick_and_draw_reference_nan_images(tiny_sd15, vae, photos):
    refused("image", P.PickAndDrawReference().encode, model=tiny_sd15, vae=vae,
            image=torch.full_like(photos[:1], NAN), match="NaN")


def test_dreambooth_nan_instance_images_write_nothing(tiny_sd15, clip, vae, photos, folders):
    bad = photos.clone()
    bad[1] = NAN
    refused("instance_images", D.DreamBoothLoRATrainer().train, model=tiny_sd15, clip=clip, vae=vae,
            instance_images=bad, num_class_images=2, steps=2, resolution=64, save_name="sks_dog", class_steps=1)
    assert written(folders) == []


def test_a_nan_file_is_never_written(folders):
    path = folders["loras"] / "nan.safetensors"
    with pytest.raises(weights_io.NonFiniteWeightsError, match=r"nan\.safetensors.*1 of 2 tensors \(b\)"):
        weights_io.save_atomic({"a": torch.zeros(2), "b": torch.tensor([0.0, NAN])}, str(path))
    assert written(folders) == []


def test_toy_reference_onto_full_size_sd15(toy, full_sd15, vae):
    toy_model, _, toy_vae = toy
    ref = run_node(B.BootPIGReferenceEncoder, model=toy_model, vae=toy_vae, images=torch.rand(1, 64, 64, 3),
                   resolution=64)[0]
    e = refused("reference", rsa, full_sd15, ref)
    assert "SD1.5 UNet of width 320" in str(e) and "width 32 " in str(e), str(e)


def test_layout_template_model_of_another_size(tiny_sd15, toy, clip):
    e = refused("template_model", layout, tiny_sd15, clip, template_model=toy[0])
    assert "width 32 (x1,2,4,4" in str(e) and "(x1,2,2,2" in str(e), str(e)


BAD_FILES = {
    "text": (b"this is not a weights file\n", "a text file"),
    "empty": (b"", "an empty file"),
    "truncated": (None, "truncated or corrupt"),
    "pickle": (pickle.dumps({"weight": [1.0, 2.0]}), "pickle"),
}


def _bad_file(folder, kind, ext=".safetensors"):
    from safetensors.torch import save_file

    path = folder / f"bad_{kind}{ext}"
    data, _ = BAD_FILES[kind]
    if data is None:
        save_file({"w": torch.zeros(64, 64)}, str(path))
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
@pytest.mark.parametrize("loader", ["bootpig", "subject_diffusion", "sams"])
def test_loaders_refuse_broken_files_naming_input_and_file(loader, kind, tiny_sd15, folders):
    path = _bad_file(folders[loader], kind, ".pth" if loader == "sams" and kind == "pickle" else ".safetensors")
    call = {"bootpig": lambda: B.BootPIGLoader().load(model=tiny_sd15, bootpig_name=path.name),
            "subject_diffusion": lambda: S.SubjectDiffusionLoader().load(model=tiny_sd15, weights_name=path.name),
            "sams": lambda: S.SAMLoader().load(sam_name=path.name)}[loader]
    name = {"bootpig": "bootpig_name", "subject_diffusion": "weights_name", "sams": "sam_name"}[loader]
    e = refused(name, call, match=path.name)
    assert BAD_FILES[kind][1] in str(e)
    assert "weights_only" not in str(e) and "Error" not in str(e).split(":")[0]
    assert written(folders, keep={path.name}) == []


class NotAWeight:
    """A pickled Python object: torch.load(weights_only=True) must refuse it (pickles stay refused)."""


def test_sam_loader_refuses_a_pickled_object(folders):
    path = folders["sams"] / "evil.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(1), "x": NotAWeight()}, str(path))
    e = refused("sam_name", S.SAMLoader().load, sam_name=path.name, match="evil.pth")
    assert "never loaded" in str(e) and "weights_only" not in str(e)


def test_bootpig_loader_refuses_wrong_keys_and_a_pickle_renamed_safetensors(tiny_sd15, folders):
    from safetensors.torch import save_file

    p = folders["bootpig"] / "keys.safetensors"
    save_file({"ref_unet.nope": torch.zeros(1)}, str(p), metadata={"personalize.format": "bootpig",
                                                                    "personalize.family": "sd15"})
    refused("bootpig_name", B.BootPIGLoader().load, model=tiny_sd15, bootpig_name=p.name, match="missing")
    q = folders["bootpig"] / "renamed.safetensors"
    torch.save({"w": torch.zeros(2)}, str(q))
    refused("bootpig_name", B.BootPIGLoader().load, model=tiny_sd15, bootpig_name=q.name,
            match="renamed.safetensors: a PyTorch pickle checkpoint")


@pytest.mark.parametrize("boxes", ["inf, 0, 10, 10", "0, nan, 10, 10", "0, 0, 1e400, 10", "-inf, 0, 8, 8"])
def test_location_mask_concat_non_finite_boxes(tiny_sd15, boxes):
    expanded = run_node(S.ExpandInputChannels, model=tiny_sd15)[0]
    refused("boxes", S.LocationMaskConcat().apply, model=expanded, latent={"samples": torch.zeros(1, 4, 8, 8)},
            boxes=boxes, match="four finite numbers")


@pytest.mark.parametrize("length", [250, 300])
def test_dreambooth_save_name_too_long_for_the_file_system(length, tiny_sd15, clip, vae, photos, folders):
    limit = weights_io.name_max(str(folders["loras"]))
    e = refused("save_name", D.DreamBoothLoRATrainer().train, model=tiny_sd15, clip=clip, vae=vae,
                instance_images=photos, num_class_images=2, steps=2, resolution=64, save_name="x" * length,
                class_steps=1, match=f"at most {limit} bytes")
    assert "shorter save_name" in str(e)
    assert written(folders) == []
    ok = "x" * (limit - len(".safetensors"))
    weights_io.check_file_name(os.path.join(folders["loras"], ok + ".safetensors"), "save_name",
                               also=[os.path.join(folders["loras"], ok + ".resume")])


def test_subject_diffusion_trainer_save_name_checked_before_training(folders):
    with pytest.raises(InputError, match="'save_name'.*at most"):
        S._trainer_save_path("y" * 300)
    assert S._trainer_save_path("  ") is None
    assert written(folders) == []


def test_expand_input_channels_straight_into_ksampler_equals_the_unexpanded_model(tiny_sd15):
    expanded = run_node(S.ExpandInputChannels, model=tiny_sd15)[0]
    pos, neg = models.random_conditioning("sd15", seed=1), models.random_conditioning("sd15", seed=2)
    ref = sample(tiny_sd15, pos, neg, steps=2)
    out = sample(expanded, pos, neg, steps=2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Location Mask Concat replaces the "no location" channel (one location wrapper, the new map)
    from personalize.nodes import location as loc

    placed = run_node(S.LocationMaskConcat, model=expanded, latent={"samples": torch.zeros(1, 4, 8, 8)},
                      boxes="8, 8, 32, 32")[0]
    assert float(loc.find_location(expanded).channel.abs().sum()) == 0.0
    channel = loc.find_location(placed).channel
    assert float(channel.min()) == 0.0 and float(channel.max()) == 1.0


@pytest.mark.parametrize("node", ["appearance", "layout"])
def test_guidance_prompt_that_differs_from_the_sampled_conditioning(tiny_sd15, clip, node):
    import nodes

    with torch.inference_mode():
        other = nodes.CLIPTextEncode().encode(clip, "a photo of a sks cat on the beach")[0]
        same = nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
        neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    with torch.inference_mode():
        m = (appearance if node == "appearance" else layout)(tiny_sd15, clip)[0]
    calls = []

    def counting(apply_model, args):
        calls.append(1)
        return apply_model(args["input"], args["timestep"], **args["c"])

    spy = m.clone()
    spy.set_model_unet_function_wrapper(counting)
    with pytest.raises(InputError, match=r"input 'prompt'.*differs from the positive conditioning from token 6"):
        sample(spy, other, neg, steps=2)
    assert calls == []  # refused when sampling starts, before the first UNet call
    # the same text runs
    assert torch.isfinite(sample(m, same, neg, steps=1)).all()


# ------------------------------------------------------------------------------------------------ over the HTTP API
def _rsa_graph(strength):
    return {
        "1": {"class_type": "PersonalizeToyWorldLoader", "inputs": {"source": "random (untrained)"}},
        "2": {"class_type": "PersonalizeToyWorldSubject", "inputs": {"subject": _subject(), "references": 1,
                                                                     "prompt_index": 0}},
        "3": {"class_type": "PersonalizeBootPIGReferenceEncoder",
              "inputs": {"model": ["1", 0], "vae": ["1", 2], "images": ["2", 0], "resolution": 64, "seed": 0}},
        "4": {"class_type": "PersonalizeBootPIGRSAPatch",
              "inputs": {"model": ["1", 0], "reference": ["3", 0], "ref_scale": 1.1, "strength": strength,
                         "start_percent": 0.0, "end_percent": 1.0, "pooling": "softmax",
                         "reference_features": "per_step", "guidance": "cfg"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a ball"}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["5", 0], "negative": ["5", 0],
                                                   "latent_image": ["6", 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }


def _subject():
    from personalize.toyworld import scenes

    return scenes.SUBJECTS[0].name


@pytest.mark.parametrize("how", ["nan_widget", "negative_through_a_link"])
def test_over_http_nan_and_linked_values_fail_the_node_naming_the_input(server, how):
    import json
    import urllib.request
    import uuid

    from scripts.server import get_json

    graph = _rsa_graph(float("nan"))
    if how == "negative_through_a_link":  # a primitive's value skips the RSA widget's min of 0
        graph["11"] = {"class_type": "PrimitiveFloat", "inputs": {"value": -1.0}}
        graph["4"]["inputs"]["strength"] = ["11", 0]
    req = urllib.request.Request(f"{server.url}/prompt", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"prompt": graph, "client_id": str(uuid.uuid4())}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        res = json.loads(r.read().decode())
    assert not res.get("node_errors"), res  # the host's queue-time check lets both through
    deadline = time.time() + 300
    while time.time() < deadline:
        h = get_json(f"{server.url}/history/{res['prompt_id']}").get(res["prompt_id"])
        if h and h.get("status", {}).get("status_str") in ("success", "error"):
            break
        time.sleep(0.5)
    # leave the server's history as it was (the browser tests read the queue panel)
    req = urllib.request.Request(f"{server.url}/history", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"delete": [res["prompt_id"]]}).encode())
    urllib.request.urlopen(req, timeout=60).close()
    assert h["status"]["status_str"] == "error", h["status"]
    (err,) = [m[1] for m in h["status"]["messages"] if m[0] == "execution_error"]
    assert err["node_type"] == "PersonalizeBootPIGRSAPatch" and err["exception_type"].endswith("InputError")
    assert "input 'strength'" in err["exception_message"]
    assert ("got nan" if how == "nan_widget" else "got -1.0") in err["exception_message"]


def test_headless_dreambooth_training_refuses_nan_images_before_training(tiny_sd15, clip, vae, photos, folders):
    """The same loop without the node (python -m scripts.train_dreambooth): the data is checked before training."""
    from personalize.nodes import dreambooth as training

    bad = photos.clone()
    bad[0, 0, 0, 0] = INF
    cfg = training.TrainConfig(instance_prompt="a photo of sks dog", class_prompt="a photo of dog", steps=2,
                               resolution=64, num_class_images=1, class_steps=1)
    refused("instance_images", training.train, tiny_sd15, clip, vae, bad, cfg,
            str(folders["loras"] / "cli.safetensors"), str(folders["output"]), match="1 infinite values")
    assert written(folders) == []


def test_weights_made_for_another_model_size_are_refused_naming_the_input(tiny_sd15, toy, folders):
    """BootPIG and Subject-Diffusion weights trained on the toy model (SD1.5 family, other width) onto the tiny SD1.5."""
    from personalize.nodes import adapters as ad
    from personalize.nodes import bootpig_weights, introspect

    toy_model = toy[0]
    sd = introspect.base_model(toy_model).diffusion_model.state_dict()
    bootpig_weights.save(str(folders["bootpig"] / "toy.safetensors"), sd,
                         {k: sd[k].clone() for k in bootpig_weights.attn1_keys(sd)}, "sd15")
    e = refused("bootpig_name", B.BootPIGLoader().load, model=tiny_sd15, bootpig_name="toy.safetensors")
    assert "toy.safetensors" in str(e) and "another model size" in str(e)
    w = ad.init_weights(run_node(S.ExpandInputChannels, model=toy_model)[0], 32, 16, 24, hidden=64, seed=0)
    weights_io.save_atomic(w.state_dict(), str(folders["subject_diffusion"] / "toy.safetensors"), w.metadata())
    refused("weights_name", S.SubjectDiffusionLoader().load, model=tiny_sd15, weights_name="toy.safetensors",
            match="this model's architecture")


@pytest.mark.parametrize("node", ["bootpig", "pick_and_draw"])
def test_a_vae_that_encodes_to_nan_is_named(tiny_sd15, vae, photos, node, monkeypatch):
    """Finite photos, but a VAE whose encoding overflows (SDXL's VAE in fp16): the encoder names 'vae'."""
    monkeypatch.setattr(type(vae), "encode", lambda self, px: torch.full((px.shape[0], 4, 8, 8), NAN))
    if node == "bootpig":
        call = lambda: B.BootPIGReferenceEncoder().encode(model=tiny_sd15, vae=vae, images=photos, resolution=64)
    else:
        call = lambda: P.PickAndDrawReference().encode(model=tiny_sd15, vae=vae, image=photos[:1], resolution=64)
    refused("vae", call, match="fp16")
