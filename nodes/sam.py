"""Subject masks with Segment Anything (``segment-anything`` from PyPI, Meta's reference implementation).

segment-anything is optional: nothing imports it until a SAM node runs, and then ``segment_anything()`` raises
``SegmentAnythingMissing`` (an ImportError saying how to install it) where it is missing.

Checkpoints come from ``models/sams/`` and are read with ``torch.load(weights_only=True)`` (or safetensors); the
architecture (ViT-B / L / H or any other size) is read off the state dict, so no config is needed. Prompts: a box,
points, or nothing - then the mask most central in the image from the automatic mask generator is kept, as
Subject-Diffusion's ``test.py`` keeps the most central mask. Holes inside the chosen mask are filled.
"""
from __future__ import annotations

import math
import os
import re

import numpy as np
import torch

from .errors import InputError, require

SAM_IMAGE_SIZE = 1024
SAM_MODEL = "SAM_MODEL"   # the node type of a loaded Segment Anything model
INSTALL_HINT = "Install it into ComfyUI's Python (`python -m pip install segment-anything`) and restart ComfyUI"


class SegmentAnythingMissing(ImportError):
    """The optional package segment-anything is not installed: only the SAM nodes need it."""

    def __init__(self, what: str = "The SAM nodes (SAM Loader, Subject Mask (SAM))"):
        super().__init__(f"Personalize: {what} need the Python package segment-anything (Meta's Segment Anything), "
                         f"which is not installed. {INSTALL_HINT}. The rest of the pack works without it.")


def segment_anything(module: str = ""):
    """``segment_anything`` (or its submodule ``module``), or SegmentAnythingMissing with the install command."""
    import importlib

    try:
        return importlib.import_module("segment_anything" + (f".{module}" if module else ""))
    except ImportError as e:
        raise SegmentAnythingMissing() from e


def sam_class():
    """segment_anything's ``Sam`` model class (for type checks), or SegmentAnythingMissing."""
    return segment_anything("modeling").Sam


def infer_config(sd: dict) -> dict:
    """encoder_embed_dim / depth / num_heads / global_attn_indexes from a SAM image-encoder state dict."""
    key = "image_encoder.patch_embed.proj.weight"
    if key not in sd:
        raise InputError("sam_name", "a Segment Anything checkpoint (image_encoder/prompt_encoder/mask_decoder keys)",
                         f"a file without '{key}'")
    dim = int(sd[key].shape[0])
    depth = 0
    while f"image_encoder.blocks.{depth}.attn.qkv.weight" in sd:
        depth += 1
    head_dim = int(sd["image_encoder.blocks.0.attn.rel_pos_h"].shape[1])
    grid = SAM_IMAGE_SIZE // int(sd[key].shape[-1])
    global_idx = [i for i in range(depth) if int(sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0]) == 2 * grid - 1]
    return {"encoder_embed_dim": dim, "encoder_depth": depth, "encoder_num_heads": dim // head_dim,
            "encoder_global_attn_indexes": global_idx}


def build(sd: dict | None = None, **config):
    """A SAM of the real architecture: from a state dict (architecture inferred), or randomly initialised from
    ``config`` (tests: small dims, never a download)."""
    _build_sam = segment_anything("build_sam")._build_sam

    if sd is not None:
        try:
            config = infer_config(sd)
        except (KeyError, IndexError, ValueError, ZeroDivisionError) as e:
            raise InputError("sam_name", "a Segment Anything checkpoint (image_encoder/prompt_encoder/mask_decoder "
                             "keys)", f"a file without the expected key {e}") from None
    sam = _build_sam(checkpoint=None, **config)
    if sd is not None:
        try:
            missing, unexpected = sam.load_state_dict(sd, strict=False)
        except RuntimeError as e:
            raise InputError("sam_name", "a Segment Anything checkpoint whose tensors fit its architecture",
                             str(e).splitlines()[-1].strip()[:200]) from None
        if missing:
            raise InputError("sam_name", "a complete Segment Anything checkpoint", f"{len(missing)} missing keys, "
                             f"e.g. {missing[:3]}")
    return sam.eval()


def load(path: str, input_name: str = "sam_name"):
    from . import weights_io

    segment_anything()  # before reading a checkpoint of gigabytes

    # .safetensors, or Meta's .pth read with torch.load(weights_only=True): never a pickle of Python objects
    sd, _ = weights_io.load(path, input_name=input_name, allow_torch=True)
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    require(isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values()), input_name,
            "a SAM state dict (tensors by key)", f"{os.path.basename(path)}: a {type(sd).__name__}")
    return build(sd)


def parse_points(text: str, input_name: str) -> list[tuple[float, float]]:
    pts = []
    for part in re.split(r"[;\n]+", text or ""):
        part = part.strip().strip("()[]")
        if not part:
            continue
        vals = [v for v in re.split(r"[,\s]+", part) if v]
        try:
            xy = [float(v) for v in vals]
        except ValueError:
            xy = []
        require(len(xy) == 2 and all(math.isfinite(v) for v in xy), input_name,
                "one point per line as 'x, y', two finite numbers in pixels", repr(part))
        pts.append((xy[0], xy[1]))
    return pts


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions not connected to the image border (scipy ships with ComfyUI)."""
    from scipy.ndimage import binary_fill_holes

    return binary_fill_holes(mask)


def most_central(masks: list[np.ndarray], h: int, w: int) -> np.ndarray | None:
    best, best_d = None, None
    for m in masks:
        ys, xs = np.nonzero(m)
        if len(ys) == 0:
            continue
        d = ((ys.mean() - (h - 1) / 2) / h) ** 2 + ((xs.mean() - (w - 1) / 2) / w) ** 2
        if best_d is None or d < best_d:
            best, best_d = m, d
    return best


def segment(sam, image: torch.Tensor, box=None, points=(), negative_points=(), points_per_side: int = 16,
            fill: bool = True) -> torch.Tensor:
    """One IMAGE [H, W, 3] (0..1) -> binary mask [H, W] (float 0/1). ``box`` (x, y, w, h) pixels."""
    sa = segment_anything()
    SamAutomaticMaskGenerator, SamPredictor = sa.SamAutomaticMaskGenerator, sa.SamPredictor

    h, w = int(image.shape[0]), int(image.shape[1])
    arr = (image[..., :3].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    with torch.inference_mode(False), torch.no_grad():
        if box is None and not points:
            gen = SamAutomaticMaskGenerator(sam, points_per_side=points_per_side)
            found = [r["segmentation"] for r in gen.generate(arr)]
            chosen = most_central(found, h, w)
            if chosen is None:
                raise InputError("image", "an image in which SAM finds a subject", "no mask from the automatic "
                                 "generator", "Give a box or points")
        else:
            pred = SamPredictor(sam)
            pred.set_image(arr)
            kw = {}
            if box is not None:
                x, y, bw, bh = box
                kw["box"] = np.array([x, y, x + bw, y + bh], dtype=np.float32)
            pts = list(points) + list(negative_points)
            if pts:
                kw["point_coords"] = np.array(pts, dtype=np.float32)
                kw["point_labels"] = np.array([1] * len(points) + [0] * len(negative_points), dtype=np.int64)
            masks, scores, _ = pred.predict(multimask_output=True, **kw)
            order = np.argsort(-scores)
            nonempty = [masks[i] for i in order if masks[i].any()]
            if not nonempty:
                raise InputError("box" if box is not None else "points", "a prompt on the subject",
                                 "a prompt for which SAM returned only empty masks")
            chosen = nonempty[0]
    chosen = chosen.astype(bool)
    if fill:
        chosen = fill_holes(chosen)
    return torch.from_numpy(chosen.astype(np.float32))


def on_white(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B,H,W,3] images, [B,H,W] masks -> the subject pasted on white (white where the mask is 0)."""
    m = mask.to(image.dtype).unsqueeze(-1)
    return image[..., :3] * m + (1.0 - m)
