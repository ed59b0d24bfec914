"""BootPIG training data: the dataset folder of (target, mask, reference, caption) triplets and the reference
augmentations (paper §3.4, App. A/E; official ``data/gen_dataset.py``, ``data/utils.py``; papers.md §A3).

Dataset folder (made by the bootstrap pipeline, or by hand - only targets, references and captions are required):

    <dataset>/dataset.json                {"format": "personalize.bootpig_dataset", "version": 1, ...}  (optional)
    <dataset>/items/<stem>.target.png     RGB, the image to learn to generate
    <dataset>/items/<stem>.mask.png       L, 0/255 subject mask (optional)
    <dataset>/items/<stem>.reference.png  RGB, the subject on white (cropped to it, any size)
    <dataset>/items/<stem>.txt            the caption, "a photo of a [object], [position] [scene]"

Datasets live in ComfyUI's output folder, ``output/bootpig_datasets/<name>``, where users look at what they made.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import InputError, require

DATASETS = "bootpig_datasets"
FORMAT = "personalize.bootpig_dataset"
WHITE = 0.96   # a pixel counts as background when all its channels are at least this bright


@dataclass
class Item:
    name: str
    target: torch.Tensor              # [H, W, 3] float32 in 0..1
    reference: torch.Tensor           # [h, w, 3]: the subject on white
    mask: torch.Tensor | None         # [H, W] in 0..1
    caption: str


def dataset_dir(name: str, input_name: str = "dataset") -> str:
    """An absolute folder, or ``<output>/bootpig_datasets/<name>``."""
    require(isinstance(name, str) and name.strip() != "", input_name, "a dataset name or folder", repr(name))
    n = name.strip()
    if os.path.isabs(n):
        return n
    if re.search(r"[\\/]|^\.|\.\.", n):
        raise InputError(input_name, f"a dataset name in output/{DATASETS}/ (no '/', '\\' or '..'), or an absolute "
                         "folder path", repr(name))
    import folder_paths

    return os.path.join(folder_paths.get_output_directory(), DATASETS, n)


def _image(path: str, mode: str, input_name: str) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
    except Exception as e:   # PIL raises many kinds for a bad file
        raise InputError(input_name, "readable PNG images in the dataset", f"{path}: {type(e).__name__}: {e}")
    return torch.from_numpy(arr.copy())


def load_items(path: str, input_name: str = "dataset") -> list[Item]:
    """Every complete item of a dataset folder (sorted by stem), checked: each target has a reference and a caption,
    all targets have one size."""
    require(os.path.isdir(path), input_name, "a dataset folder with items/", repr(path))
    items_dir = os.path.join(path, "items")
    require(os.path.isdir(items_dir), input_name, "a dataset folder with an items/ folder", f"{path} without one")
    files = set(os.listdir(items_dir))
    stems = sorted(f[: -len(".target.png")] for f in files if f.endswith(".target.png"))
    require(len(stems) > 0, input_name, "a dataset with at least one <name>.target.png in items/", f"none in {path}")
    out, size = [], None
    for s in stems:
        for suffix in (".reference.png", ".txt"):
            if s + suffix not in files:
                raise InputError(input_name, f"a {suffix} next to every .target.png",
                                 f"{os.path.join(items_dir, s + '.target.png')} without {s + suffix}")
        target = _image(os.path.join(items_dir, s + ".target.png"), "RGB", input_name)
        if size is None:
            size = tuple(target.shape[:2])
        elif tuple(target.shape[:2]) != size:
            raise InputError(input_name, f"targets of one size ({size[1]}x{size[0]}, the first one's)",
                             f"{s}.target.png of {target.shape[1]}x{target.shape[0]}")
        mask = None
        if s + ".mask.png" in files:
            mask = _image(os.path.join(items_dir, s + ".mask.png"), "L", input_name)
        with open(os.path.join(items_dir, s + ".txt"), encoding="utf-8") as fh:
            caption = fh.read().strip()
        out.append(Item(s, target, _image(os.path.join(items_dir, s + ".reference.png"), "RGB", input_name), mask,
                        caption))
    return out


def first_clause(caption: str) -> str:
    """The caption's first comma-separated clause: BootPIG's reference prompt in training ("a photo of a red rose")."""
    return caption.split(",")[0].strip()


def foreground_box(image: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the pixels that are not white; the whole image when all are."""
    fg = (image < WHITE).any(dim=-1)
    ys, xs = torch.nonzero(fg, as_tuple=True)
    if len(ys) == 0:
        return 0, image.shape[0], 0, image.shape[1]
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def _rand(g: torch.Generator) -> float:
    return float(torch.rand((), generator=g))


def _jitter(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Colour jitter (brightness, contrast, saturation 0.2, hue 0.05), factors drawn from ``g``."""
    import torchvision.transforms.functional as TF

    x = img.permute(2, 0, 1)
    b, c, s = (1 + 0.4 * (_rand(g) - 0.5) for _ in range(3))
    h = 0.1 * (_rand(g) - 0.5)
    x = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x, b), c), s), h)
    return x.permute(1, 2, 0).clamp(0, 1)


def augment_reference(reference: torch.Tensor, generator: torch.Generator, size: int) -> torch.Tensor:
    """The official augmentations, a pure function of ``generator``: crop to the foreground; scale it to fill the
    ``size`` canvas along its longer side (``RandomResizeForeground`` with min_pct_area 1.0) at a random position
    along the free axis, on white; horizontal flip p 0.5; colour jitter p 0.1; random erasing p 0.4 of 2-25 % of the
    area (aspect 0.3-3.3), filled white. [H, W, 3] -> [size, size, 3]."""
    g = generator
    t, b, l, r = foreground_box(reference)
    fg = reference[t:b, l:r].float()
    h, w = fg.shape[:2]
    k = size / max(h, w)
    nh, nw = max(1, min(size, round(h * k))), max(1, min(size, round(w * k)))
    fg = F.interpolate(fg.permute(2, 0, 1)[None], size=(nh, nw), mode="bilinear", align_corners=False,
                       antialias=True)[0].permute(1, 2, 0).clamp(0, 1)
    canvas = torch.ones(size, size, 3)
    top = int(_rand(g) * (size - nh + 1)) if nh < size else 0
    left = int(_rand(g) * (size - nw + 1)) if nw < size else 0
    top, left = min(top, size - nh), min(left, size - nw)
    canvas[top:top + nh, left:left + nw] = fg
    if _rand(g) < 0.5:
        canvas = canvas.flip(1)
    if _rand(g) < 0.1:
        canvas = _jitter(canvas, g)
    if _rand(g) < 0.4:
        for _ in range(10):   # torchvision's RandomErasing: up to 10 tries for a box that fits
            area = size * size * (0.02 + 0.23 * _rand(g))
            ratio = math.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * _rand(g))
            eh, ew = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if 0 < eh < size and 0 < ew < size:
                y, x = int(_rand(g) * (size - eh + 1)), int(_rand(g) * (size - ew + 1))
                canvas[y:y + eh, x:x + ew] = 1.0
                break
    return canvas
