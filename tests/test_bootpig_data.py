"""The BootPIG bootstrap pipeline (nodes/bootpig_data.py): captions, sampling through ComfyUI, masks, the border
rule, references on white, and a dataset folder that resumes and that BootPIG Trainer reads."""
from __future__ import annotations

import json
import os

import pytest
import torch

from personalize.nodes import bootpig_data as D
from personalize.nodes.errors import InputError
from personalize.nodes.mask_sources import MaskSource
from scripts import models


class BoxMasks(MaskSource):
    """A deterministic mask source for tiny random models (whose images show nothing to segment): every third image
    gets a box at the top-left corner (touching the border), the others a central box. Counts its calls."""

    def __init__(self):
        self.seen = 0

    def describe(self) -> str:
        return "test boxes"

    def masks_of(self, images):
        b, h, w = images.shape[:3]
        out = torch.zeros(b, h, w)
        for i in range(b):
            if (self.seen + i) % 3 == 2:
                out[i, : h // 3, : w // 3] = 1
            else:
                out[i, h // 4: 3 * h // 4, w // 3: 2 * w // 3] = 1
        self.seen += b
        return out


@pytest.fixture(scope="module")
def mods():
    return models.build_model("sd15", tiny=True, seed=0), models.build_clip(seed=0), models.build_vae(seed=0)


def settings(**kw):
    base = dict(count=6, seed=3, steps=2, cfg=2.0, width=64, height=64, batch_size=2)
    base.update(kw)
    return D.BootstrapSettings(**base)


def files(folder):
    return {os.path.join(d, f): open(os.path.join(folder, d, f), "rb").read()
            for d in ("items", "discarded") for f in sorted(os.listdir(os.path.join(folder, d)))}


def test_bootstrap_writes_foregrounds_on_white_and_sets_aside_border_touching_masks(mods, tmp_path):
    m, c, v = mods
    out = str(tmp_path / "ds")
    r = D.bootstrap(m, c, v, BoxMasks(), out, settings(), D.CaptionGrammar.general())
    assert (r.kept, r.discarded, r.generated) == (4, 2, 6)
    items = D.load_items(out)
    assert [it.name for it in items] == ["000000", "000001", "000003", "000004"]
    for it in items:
        assert it.caption == D.CaptionGrammar.general().caption(3, int(it.name))
        assert D.first_clause(it.caption).startswith("a photo of ") and ", " in it.caption
        t, b, l, r_ = D.mask_box(it.mask)
        # the reference is the target's foreground, cropped to the mask's box, white where the mask is 0
        want = torch.where(it.mask[t:b, l:r_, None] > 0.5, it.target[t:b, l:r_], torch.ones(()))
        assert it.reference.shape == want.shape and (it.reference - want).abs().max() <= 1 / 255 + 1e-6
        assert not D.touches_border(it.mask, settings().border_px())
        assert float(it.target.std()) > 0          # a sampled image, not a blank
    dropped = sorted(f for f in os.listdir(os.path.join(out, "discarded")) if f.endswith(".mask.png"))
    assert dropped == ["000002.mask.png", "000005.mask.png"]
    for f in dropped:
        mask = D._image(os.path.join(out, "discarded", f), "L", "t")
        assert D.touches_border(mask, settings().border_px())
        assert "touches the" in open(os.path.join(out, "discarded", f.replace(".mask.png", ".txt"))).read()
    meta = json.load(open(os.path.join(out, "dataset.json")))
    assert meta["kept"] == 4 and meta["discarded"] == 2 and meta["recipe"]["mask_source"] == "test boxes"
    assert r.preview.shape == (4, 128, 384, 3)
    assert not [f for d in ("items", "discarded") for f in os.listdir(os.path.join(out, d)) if f.startswith(".")]


def test_targets_are_the_host_samplers_images_and_a_rerun_continues(mods, tmp_path):
    """Item i is what ComfyUI's KSampler draws with noise seed seed + i; a run stopped after 3 items, continued to
    6, equals one run of 6 byte for byte (batch sizes differ too), and samples only the 3 missing items."""
    import comfy.sample
    import comfy.utils

    m, c, v = mods
    whole = str(tmp_path / "whole")
    D.bootstrap(m, c, v, BoxMasks(), whole, settings(batch_size=1), D.CaptionGrammar.general())
    part = str(tmp_path / "part")
    D.bootstrap(m, c, v, BoxMasks(), part, settings(count=3, batch_size=1), D.CaptionGrammar.general())
    boxes = BoxMasks()
    boxes.seen = 3
    r = D.bootstrap(m, c, v, boxes, part, settings(count=6, batch_size=1), D.CaptionGrammar.general())
    assert r.generated == 3 and boxes.seen == 6
    assert files(part) == files(whole)
    # item 4 against a plain sampling of its caption with seed 3 + 4
    cap = D.CaptionGrammar.general().caption(3, 4)
    cond, pooled = c.encode_from_tokens(c.tokenize(cap), return_pooled=True)
    ncond, npooled = c.encode_from_tokens(c.tokenize(""), return_pooled=True)
    lat = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(lat, 7)
    s = comfy.sample.sample(m, noise, 2, 2.0, "euler", "normal", [[cond, {"pooled_output": pooled}]],
                            [[ncond, {"pooled_output": npooled}]], lat, disable_pbar=True, seed=7)
    img = v.decode(s)[0].float().clamp(0, 1)
    got = D._image(os.path.join(whole, "items", "000004.target.png"), "RGB", "t")
    assert (got - img).abs().max() <= 1 / 255 + 1e-5


def test_changed_recipe_is_refused_unless_overwrite(mods, tmp_path):
    m, c, v = mods
    out = str(tmp_path / "ds")
    D.bootstrap(m, c, v, BoxMasks(), out, settings(count=2), D.CaptionGrammar.general())
    with pytest.raises(InputError, match="'dataset'.*steps"):
        D.bootstrap(m, c, v, BoxMasks(), out, settings(count=2, steps=3), D.CaptionGrammar.general())
    r = D.bootstrap(m, c, v, BoxMasks(), out, settings(count=2, steps=3), D.CaptionGrammar.general(),
                    overwrite=True)
    assert r.generated == 2
    assert json.load(open(os.path.join(out, "dataset.json")))["recipe"]["steps"] == 3


@pytest.mark.parametrize("kw,name", [({"count": 0}, "count"), ({"cfg": float("nan")}, "cfg"),
                                     ({"width": 100}, "width"), ({"sampler_name": "nope"}, "sampler_name"),
                                     ({"steps": 0}, "steps")])
def test_bad_settings_are_named_before_sampling(mods, tmp_path, kw, name):
    m, c, v = mods
    boxes = BoxMasks()
    with pytest.raises(InputError, match=f"'{name}'"):
        D.bootstrap(m, c, v, boxes, str(tmp_path / "ds"), settings(**kw), D.CaptionGrammar.general())
    assert boxes.seen == 0 and not (tmp_path / "ds").exists()


def test_caption_grammars():
    g = D.CaptionGrammar.general()
    caps = [g.caption(0, i) for i in range(50)]
    assert caps == [g.caption(0, i) for i in range(50)] and len(set(caps)) > 40
    assert all(c.startswith("a photo of ") and c.count(",") == 1 for c in caps)
    assert g.caption(1, 0) != g.caption(0, 0)
    t = D.CaptionGrammar.from_text("# my objects\nobjects:\nred sneaker\nblue mug\nscenes:\na beach\na desk\n")
    assert {D.first_clause(t.caption(0, i)) for i in range(40)} == {"a photo of a red sneaker", "a photo of a blue mug"}
    assert {t.caption(0, i).split(", ")[1] for i in range(40)} == {"a beach", "a desk"}
    lines = D.CaptionGrammar.from_text("a photo of a dog, on a sofa\n\na photo of a cat, in a box\n")
    assert [lines.caption(0, i) for i in range(3)] == ["a photo of a dog, on a sofa", "a photo of a cat, in a box",
                                                       "a photo of a dog, on a sofa"]
    with pytest.raises(InputError, match="'caption_text'"):
        D.CaptionGrammar.from_text("  \n# nothing\n")
    with pytest.raises(InputError, match="'caption_text'.*scenes"):
        D.CaptionGrammar.from_text("objects:\nred sneaker\n")


def test_toy_captions_use_the_toy_vocabulary_only():
    from personalize.toyworld import scenes
    from personalize.toyworld.captions import ToyCaptions

    t = ToyCaptions()
    caps = [t.caption(0, i) for i in range(200)]
    assert caps == [t.caption(0, i) for i in range(200)]
    known = {w for s in (scenes.caption(scenes.sample_scene(__import__("numpy").random.default_rng(i)))
                         for i in range(500)) for w in s.split()}
    for cap in caps:
        obj, scene = cap.split(", ")
        assert scene in scenes.BACKGROUNDS.values()
        assert set(obj.split()) <= known and any(cl in obj.split() for cl in scenes.CLASSES)


@pytest.fixture
def output_dir(tmp_path):
    import folder_paths

    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path / "output"))
    yield tmp_path / "output"
    folder_paths.set_output_directory(old)


def test_bootstrap_node_and_trainer_read_the_same_folder(mods, tmp_path, output_dir):
    import folder_paths
    from helpers import run_node

    from personalize import bootpig_nodes as B

    m, c, v = mods
    name, kept, preview = run_node(B.BootPIGBootstrapNode, model=m, clip=c, vae=v, mask_source=BoxMasks(),
                                   dataset="node_ds", count=3, steps=1, cfg=1.0, width=64, height=64,
                                   captions="from text", caption_text="a photo of a toy, on a table")
    assert name == "node_ds" and kept == 2 and preview.shape == (2, 128, 384, 3)
    assert len(D.load_items(D.dataset_dir(name))) == 2
    with pytest.raises(InputError, match="'captions'"):
        run_node(B.BootPIGBootstrapNode, model=m, clip=c, vae=v, mask_source=BoxMasks(), dataset="x", count=1,
                 captions="gpt")
    with pytest.raises(InputError, match="'mask_source'"):
        run_node(B.BootPIGBootstrapNode, model=m, clip=c, vae=v, mask_source=torch.zeros(1), dataset="x", count=1)
    folder_paths.add_model_folder_path("bootpig", str(tmp_path / "models_bootpig"), is_default=True)
    _, _, fname, _ = run_node(B.BootPIGTrainerNode, model=m, clip=c, vae=v, dataset=name, steps=1, batch_size=1,
                              save_name="from_bootstrap", checkpoint_every=0)
    # the Loader takes the trainer's file name as a link (it does not exist when the prompt is validated)
    assert B.BootPIGLoader.VALIDATE_INPUTS(input_types={"model": "MODEL", "bootpig_name": "STRING"}) is True
    assert B.BootPIGLoader.VALIDATE_INPUTS(input_types={"model": "MODEL", "bootpig_name": "INT"}) is not True
    assert B.BootPIGLoader.VALIDATE_INPUTS(input_types={"model": "LATENT"}, bootpig_name=fname) is not True
    assert B.BootPIGLoader.VALIDATE_INPUTS(input_types={}, bootpig_name="missing.safetensors") is not True
    assert B.BootPIGLoader.VALIDATE_INPUTS(input_types={}, bootpig_name=fname) is True
    base, ref = run_node(B.BootPIGLoader, model=m, bootpig_name=fname)
    assert len(base.patches) > 0 and ref.model is not m.model


def test_example_workflow_bootstraps_trains_loads_and_samples_on_the_toy_model(tmp_path, output_dir):
    """example_workflows/toyworld_bootpig_training.json, converted like the CLI converts it and run node by node:
    Bootstrap (toy segmenter) -> Trainer -> Loader (its file name linked) -> Reference Encoder -> RSA Patch ->
    KSampler, with fewer steps."""
    import folder_paths
    import nodes
    from helpers import convert_example, run_api

    import personalize
    from personalize.toyworld import model as tw_model

    folder_paths.add_model_folder_path("bootpig", str(tmp_path / "models_bootpig"), is_default=True)
    api = convert_example("toyworld_bootpig_training.json")
    by_type = {n["class_type"]: n["inputs"] for n in api.values()}
    assert by_type["PersonalizeBootPIGLoader"]["bootpig_name"][0] != by_type["PersonalizeBootPIGLoader"]["model"][0]
    assert isinstance(by_type["PersonalizeBootPIGTrainer"]["dataset"], list)   # linked to the Bootstrap node
    by_type["PersonalizeBootPIGBootstrap"].update(count=4, steps=4)
    by_type["PersonalizeBootPIGTrainer"].update(steps=2)
    by_type["KSampler"].update(steps=3)
    saved = run_api(api, {**nodes.NODE_CLASS_MAPPINGS, **personalize.NODE_CLASS_MAPPINGS})
    size = tw_model.shipped_image_size()   # the workflow's latents and references: the shipped model's 128 px
    assert len(saved) == 1 and saved[0].shape == (4, size, size, 3) and torch.isfinite(saved[0]).all()
    meta = json.load(open(output_dir / "bootpig_datasets" / "toyworld_example" / "dataset.json"))
    assert meta["kept"] >= 1 and meta["recipe"]["mask_source"].startswith("toy segmenter")
    assert (tmp_path / "models_bootpig" / "toyworld_bootpig_example.safetensors").is_file()


def test_headless_script_writes_a_dataset_and_names_a_bad_mask_source(tmp_path):
    import subprocess
    import sys

    from test_dreambooth import REPO, subprocess_env

    out = tmp_path / "headless"
    cmd = [sys.executable, "-m", "scripts.bootstrap_bootpig", "--random-tiny", "0", "--mask-source", "toy",
           "--count", "3", "--steps", "1", "--dataset", str(out), "--cpu"]
    r = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.load(open(out / "dataset.json"))
    assert meta["kept"] + meta["discarded"] == 3 and meta["recipe"]["width"] == 64
    assert meta["recipe"]["mask_source"].startswith("toy segmenter")
    r = subprocess.run(cmd[:6] + ["sam2"] + cmd[7:], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 2 and "'--mask-source'" in r.stderr


def test_sam_mask_source_runs_segment_anything_per_image():
    """Mask Source (SAM) over the real segment-anything model (small encoder, random weights: whatever it finds):
    one 0/1 mask per image, the same one ``nodes.sam.segment`` gives, or an empty mask where SAM finds nothing."""
    from helpers import run_node

    from personalize import bootpig_nodes as B
    from personalize.nodes import sam as sam_lib

    with torch.inference_mode(False):
        sam = sam_lib.build(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                            encoder_global_attn_indexes=[1])
    (source,) = run_node(B.MaskSourceSAMNode, sam_model=sam, points_per_side=4)
    images = torch.ones(2, 64, 64, 3)
    images[0, 16:48, 20:44] = torch.tensor([0.8, 0.1, 0.1])
    masks = source(images)
    assert masks.shape == (2, 64, 64) and set(masks.unique().tolist()) <= {0.0, 1.0}
    for img, m in zip(images, masks):
        try:
            want = sam_lib.segment(sam, img, points_per_side=4)
        except InputError:
            want = torch.zeros(64, 64)
        assert torch.equal(m, want)
    assert "SAM" in source.describe()
    with pytest.raises(InputError, match="'sam_model'"):
        run_node(B.MaskSourceSAMNode, sam_model=object(), points_per_side=4)


def test_specks_and_pinholes_of_a_mask_are_cleaned_before_the_border_rule(mods, tmp_path):
    """A segmenter's stray speck at the border does not discard a central subject; its pinholes are filled."""

    class Specks(MaskSource):
        def masks_of(self, images):
            m = torch.zeros(images.shape[:3])
            m[:, 16:48, 16:48] = 1
            m[:, 30, 30] = 0          # a pinhole
            m[:, 0:2, 0:2] = 1        # a speck in the corner
            return m

    m, c, v = mods
    r = D.bootstrap(m, c, v, Specks(), str(tmp_path / "ds"), settings(count=2), D.CaptionGrammar.general())
    assert (r.kept, r.discarded) == (2, 0)
    for it in D.load_items(str(tmp_path / "ds")):
        want = torch.zeros(64, 64)
        want[16:48, 16:48] = 1
        assert torch.equal(it.mask, want)
