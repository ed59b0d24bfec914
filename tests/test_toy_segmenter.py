"""The toy world's mask source (toyworld/segmenter.py): the shipped segmenter segments held-out subjects it never saw,
the mask source and its node take ComfyUI IMAGE tensors, and its training stage resumes bit-identically. (That its
training generators never draw a held-out subject is checked with the other generators in tests/test_toyworld.py.)"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from helpers import run_node

from personalize import toy_world_nodes
from personalize.nodes.errors import InputError
from personalize.toyworld import model as tw_model
from personalize.toyworld import scenes, segmenter


def _iou(pred, gt):
    pred, gt = pred > 0.5, torch.as_tensor(gt) > 0.5
    return ((pred & gt).sum(dim=(1, 2)).float() / (pred | gt).sum(dim=(1, 2)).clamp(min=1).float())


@pytest.fixture(scope="module")
def shipped():
    if not os.path.isfile(tw_model.SEGMENTER_PATH):
        pytest.fail(f"{tw_model.SEGMENTER_PATH} missing: run scripts/train_toyworld.py segmenter")
    return segmenter.load(tw_model.SEGMENTER_PATH)


@pytest.fixture(scope="module")
def held_out():
    """2 reference renders of each of the 12 held-out subjects at 128 px (never in any training data)."""
    refs = [r for s in scenes.SUBJECTS for r in scenes.subject_references(s, 2, size=scenes.V2_SIZE)]
    return torch.from_numpy(np.stack([r[0] for r in refs])), torch.from_numpy(np.stack([r[1] for r in refs]))


def test_shipped_file_is_small_fp16_and_complete():
    from safetensors import safe_open

    assert os.path.getsize(tw_model.SEGMENTER_PATH) <= 1_000_000
    with safe_open(tw_model.SEGMENTER_PATH, "pt") as f:
        meta = f.metadata()
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    cfg = json.loads(meta["config"])
    assert meta["stage"] == "segmenter" and meta["complete"] == "true" and int(meta["steps_done"]) == cfg["steps"]
    n = sum(p.numel() for p in segmenter.build().parameters())
    assert 1e5 <= n <= 5e5


def test_shipped_segmenter_segments_held_out_subjects(shipped, held_out):
    x, gt = held_out
    v = _iou(segmenter.predict(shipped, x), gt)
    print(f"\ntoy segmenter IoU on {len(v)} held-out subject renders at 128 px: mean {v.mean():.3f}, min {v.min():.3f}")
    assert v.mean() >= 0.85 and v.min() >= 0.5


def test_mask_source_takes_comfy_images(shipped, held_out):
    x, gt = held_out
    src = segmenter.ToySegmenterMaskSource(shipped, tw_model.SEGMENTER_PATH)
    assert src.describe() == "toy segmenter (segmenter.safetensors)"
    with torch.inference_mode():                  # as ComfyUI's executor calls nodes
        m = src(x[:3])
    assert m.shape == (3, 128, 128) and m.dtype == torch.float32 and m.device.type == "cpu"
    assert set(m.unique().tolist()) <= {0.0, 1.0} and _iou(m, gt[:3]).min() > 0.5
    # a size that is no multiple of 16 (padded inside), a single image, a non-contiguous view
    odd = x[3:5, 4:124, 10:110]
    m = src(odd)
    assert m.shape == (2, 120, 100) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(src(x[5:6].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)), src(x[5:6]))
    with pytest.raises(ValueError, match="IMAGE"):
        src(torch.zeros(1, 3, 8, 8))
    if torch.cuda.is_available():                 # GPU IMAGE in, CPU masks out
        g = src(x[:2].cuda())
        assert g.device.type == "cpu" and g.shape == (2, 128, 128)


def test_node_returns_a_working_mask_source(held_out, monkeypatch, tmp_path):
    node = toy_world_nodes.NODE_CLASS_MAPPINGS["PersonalizeToyWorldSegmenter"]
    assert toy_world_nodes.NODE_DISPLAY_NAME_MAPPINGS["PersonalizeToyWorldSegmenter"] == \
        "Toy World Segmenter (mask source)"
    assert node.RETURN_TYPES == ("PERSONALIZE_MASK_SOURCE",) and node.OUTPUT_TOOLTIPS
    assert all("tooltip" in spec[1] for spec in node.INPUT_TYPES()["required"].values())
    (src,) = run_node(node, source="trained")
    x, gt = held_out
    assert isinstance(src, segmenter.ToySegmenterMaskSource) and "segmenter.safetensors" in src.describe()
    with torch.inference_mode():
        m = src(x[6:9])
    assert m.shape == (3, 128, 128) and _iou(m, gt[6:9]).mean() > 0.8
    monkeypatch.setattr(tw_model, "SEGMENTER_PATH", str(tmp_path / "absent.safetensors"))
    with pytest.raises(InputError, match="segmenter"):
        run_node(node, source="trained")


def test_segmenter_stage_resumes_without_losing_a_step(tmp_path):
    """2 steps, stopped, resumed for 1 more, ends bit-identical to 3 uninterrupted steps (tiny config)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from scripts import train_toyworld as tt

    tiny = ["segmenter", "--steps", "3", "--threads", "1", "--set", "batch=2", "--set", "size=32",
            "--set", "vae_pool=2", "--set", "vae_per_batch=1", "--set", "eval_refs=0", "--set", "save_every=100"]
    tt.main(tiny + ["--out", str(tmp_path / "straight")])
    tt.main(tiny + ["--out", str(tmp_path / "resumed"), "--stop-after", "2"])
    assert torch.load(tmp_path / "resumed" / "segmenter.ckpt", weights_only=False)["step"] == 2
    with safe_open(str(tmp_path / "resumed" / "segmenter.safetensors"), "pt") as f:
        assert f.metadata()["complete"] == "false" and f.metadata()["steps_done"] == "2"
    two = load_file(str(tmp_path / "resumed" / "segmenter.safetensors"))
    tt.main(tiny + ["--out", str(tmp_path / "resumed"), "--resume"])
    a, b = (load_file(str(tmp_path / d / "segmenter.safetensors")) for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], two[k]) for k in a)          # the third step did change the weights
    with safe_open(str(tmp_path / "resumed" / "segmenter.safetensors"), "pt") as f:
        assert f.metadata()["complete"] == "true" and f.metadata()["steps_done"] == "3"
