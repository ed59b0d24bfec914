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


# ---------------------------------------------------------------- captions

# the built-in grammar: "a photo of a [object], [position] [scene]" (paper App. A; the paper asked ChatGPT for such
# captions, the pack draws them from these lists - no network, no language model)
GENERAL_OBJECTS = (
    "red rose", "ceramic mug", "teddy bear", "leather backpack", "pair of sneakers", "toy robot", "rubber duck",
    "wooden chair", "vintage camera", "glass vase", "corgi dog", "tabby cat", "potted cactus", "red bicycle",
    "alarm clock", "plush bunny", "blue teapot", "cowboy boot", "table lamp", "acoustic guitar", "toy car",
    "straw hat", "candle", "clay pot", "wristwatch", "sunflower", "pineapple", "soccer ball", "rubber boot",
    "owl figurine", "stuffed elephant", "coffee grinder", "sports car", "golden retriever", "bonsai tree",
)
GENERAL_POSITIONS = ("sitting on", "lying on", "standing in", "placed in front of", "in the middle of", "next to",
                     "on top of", "in the corner of")
GENERAL_SCENES = (
    "a wooden table", "a sandy beach", "a snowy forest", "a city street", "a green meadow", "a kitchen counter",
    "a stone wall", "a cozy living room", "a desert road", "a mountain lake", "a rainy sidewalk", "a garden path",
    "a marble floor", "a park bench", "a library shelf", "a field of flowers",
)


@dataclass(frozen=True)
class CaptionGrammar:
    """Captions "a photo of a <object>, <position> <scene>", or a fixed list of captions (cycled).

    ``caption(seed, index)`` is a pure function of its arguments: a resumed bootstrap draws the same captions."""

    objects: tuple = ()
    positions: tuple = ()
    scenes: tuple = ()
    captions: tuple = ()
    name: str = "custom"

    @classmethod
    def general(cls) -> "CaptionGrammar":
        return cls(GENERAL_OBJECTS, GENERAL_POSITIONS, GENERAL_SCENES, name="built-in")

    @classmethod
    def from_text(cls, text: str, input_name: str = "caption_text") -> "CaptionGrammar":
        """A user's text: either sections ``objects:`` / ``positions:`` / ``scenes:`` with one entry per line (a
        position may be empty: leave the section out), or one full caption per line. ``#`` starts a comment."""
        require(isinstance(text, str), input_name, "text", type(text).__name__)
        lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
        lines = [ln for ln in lines if ln]
        require(len(lines) > 0, input_name, "captions, one per line, or 'objects:' / 'scenes:' sections",
                "no text")
        sections: dict[str, list[str]] = {}
        current = None
        for ln in lines:
            head = ln.lower().rstrip(":").strip()
            if ln.endswith(":") and head in ("objects", "positions", "scenes"):
                current = head
                sections.setdefault(head, [])
            elif current is not None:
                sections[current].append(ln)
            elif sections:
                break
        if not sections:
            return cls(captions=tuple(lines), name="captions from text")
        for need in ("objects", "scenes"):
            require(len(sections.get(need, [])) > 0, input_name,
                    f"at least one entry under '{need}:' (sections: objects:, positions:, scenes:)",
                    f"no '{need}:' entries")
        return cls(tuple(sections["objects"]), tuple(sections.get("positions", ())), tuple(sections["scenes"]),
                   name="grammar from text")

    def describe(self) -> dict:
        if self.captions:
            return {"name": self.name, "captions": len(self.captions)}
        return {"name": self.name, "objects": len(self.objects), "positions": len(self.positions),
                "scenes": len(self.scenes)}

    def caption(self, seed: int, index: int) -> str:
        if self.captions:
            return self.captions[(int(seed) + int(index)) % len(self.captions)]
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (2 ** 63))
        pick = lambda xs: xs[int(torch.randint(len(xs), (), generator=g))]   # noqa: E731
        obj = pick(self.objects)
        pos = pick(self.positions) if self.positions else ""
        scene = pick(self.scenes)
        art = "" if re.match(r"^(a|an|the|pair|\d)\b", obj) else ("an " if obj[0].lower() in "aeiou" else "a ")
        return f"a photo of {art}{obj}, {(pos + ' ') if pos else ''}{scene}".replace("  ", " ")


# ---------------------------------------------------------------- the bootstrap pipeline (paper §3.4, App. A)

BOOTSTRAP_VERSION = 1
BORDER_AT_512 = 25        # the released generator discards a mask within 25 px of the border of a 512 px image
MIN_AREA = 0.01           # ... and the pack discards masks of less than 1 % of the image (nothing found)


@dataclass(frozen=True)
class BootstrapSettings:
    count: int = 1000
    seed: int = 0
    steps: int = 25
    cfg: float = 7.0
    sampler_name: str = "euler"
    scheduler: str = "normal"
    width: int = 512
    height: int = 512
    batch_size: int = 1
    negative: str = ""
    border: int = -1          # px; -1 = 25 px at 512 (scaled to the image size)

    def border_px(self) -> int:
        if self.border >= 0:
            return int(self.border)
        return max(1, round(BORDER_AT_512 * min(self.width, self.height) / 512))


def check_settings(s: BootstrapSettings) -> None:
    """Every setting checked, each error naming its input, before anything is sampled."""
    import comfy.samplers

    from .validation import check_float, check_int

    check_int(s.count, "count", {"min": 1})
    check_int(s.steps, "steps", {"min": 1, "max": 10000})
    check_float(s.cfg, "cfg", {"min": 0.0, "max": 100.0})
    check_int(s.batch_size, "batch_size", {"min": 1, "max": 256})
    for name, v in (("width", s.width), ("height", s.height)):
        check_int(v, name, {"min": 64, "max": 8192})
        require(v % 8 == 0, name, "a multiple of 8", v)
    require(s.sampler_name in comfy.samplers.KSampler.SAMPLERS, "sampler_name",
            f"one of ComfyUI's samplers {list(comfy.samplers.KSampler.SAMPLERS)}", repr(s.sampler_name))
    require(s.scheduler in comfy.samplers.KSampler.SCHEDULERS, "scheduler",
            f"one of ComfyUI's schedulers {list(comfy.samplers.KSampler.SCHEDULERS)}", repr(s.scheduler))
    check_int(s.border, "border", {"min": -1, "max": min(s.width, s.height) // 2 - 1})


def touches_border(mask: torch.Tensor, border: int) -> bool:
    """Whether any mask pixel lies within ``border`` px of the image's edge."""
    m = mask > 0.5
    b = max(1, int(border))
    return bool(m[:b].any() or m[-b:].any() or m[:, :b].any() or m[:, -b:].any())


def largest_component(mask: torch.Tensor) -> torch.Tensor:
    """The mask's largest 8-connected region with its holes filled (``sam.fill_holes``, as SAM's masks are): the
    subject, without the stray specks and pinholes a segmenter leaves. An empty mask stays empty. (scipy ships with
    ComfyUI.)"""
    import numpy as np
    from scipy.ndimage import label

    from .sam import fill_holes

    m = (mask > 0.5).cpu().numpy()
    lab, n = label(m, structure=np.ones((3, 3), dtype=int))
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        m = lab == int(sizes.argmax())
    return torch.from_numpy(fill_holes(m).astype(np.float32))


def mask_box(mask: torch.Tensor) -> tuple[int, int, int, int]:
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def reference_from(target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BootPIG's reference: the target's foreground pasted on white (``sam.on_white``), cropped to the mask's box.
    [H,W,3], [H,W]."""
    from .sam import on_white

    t, b, l, r = mask_box(mask)
    return on_white(target[None].float(), (mask > 0.5)[None])[0, t:b, l:r].contiguous()


def _png(arr: torch.Tensor, path: str) -> None:
    """Write an image tensor (HxWx3 or HxW, 0..1) as PNG through a temporary name, then rename."""
    import numpy as np
    from PIL import Image

    a = (arr.detach().float().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    im = Image.fromarray(a, "L" if a.ndim == 2 else "RGB")
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".partial")
    im.save(tmp, format="PNG")
    os.replace(tmp, path)


def _text(text: str, path: str) -> None:
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".partial")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def item_seed(seed: int, index: int) -> int:
    """The noise seed of item ``index``: a KSampler with this seed, batch 1, draws the same start noise."""
    return (int(seed) + int(index)) % (2 ** 64)


def stem(index: int) -> str:
    return f"{index:06d}"


@dataclass
class BootstrapResult:
    path: str
    kept: int
    discarded: int
    generated: int           # items sampled in this call (the rest were on disk already)
    preview: torch.Tensor    # [N, H, 3W, 3]: target | mask | reference of the first kept items


def _recipe(s: BootstrapSettings, grammar: CaptionGrammar, family: str, mask_source: str) -> dict:
    d = {k: getattr(s, k) for k in ("seed", "steps", "cfg", "sampler_name", "scheduler", "width", "height",
                                     "negative")}
    d.update(border_px=s.border_px(), min_area=MIN_AREA, mask_post="largest component, holes filled",
             grammar=grammar.describe(), family=family, mask_source=mask_source)
    return d


def _encode(clip, text: str):
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond, pooled


def bootstrap(model, clip, vae, mask_source, out_dir: str, settings: BootstrapSettings, grammar: CaptionGrammar,
              overwrite: bool = False, check_interrupt=None, progress=None) -> BootstrapResult:
    """Sample ``settings.count`` targets from ``model`` with ComfyUI's own sampling (``comfy.sample.sample``), one
    caption each from ``grammar``; segment them with ``mask_source``; keep those whose mask is not empty and does not
    touch the border; write (target, mask, reference, caption) to ``out_dir/items/`` and the discarded ones, with
    their reason, to ``out_dir/discarded/``. Each item is written through temporary names (its target last), so a
    killed run leaves only whole items, and a rerun with the same recipe continues where it stopped (or extends a
    dataset to a larger ``count``). The recipe is in ``out_dir/dataset.json``; a different one is refused unless
    ``overwrite``, which starts the folder afresh."""
    import json
    import shutil

    import comfy.model_management
    import comfy.sample
    import comfy.utils

    from . import introspect
    from .mask_sources import check_source

    check_settings(settings)
    check_source(mask_source)
    s = settings
    fam = introspect.family(model, "model")
    describe = getattr(mask_source, "describe", lambda: type(mask_source).__name__)()
    recipe = _recipe(s, grammar, fam, describe)
    meta_path = os.path.join(out_dir, "dataset.json")
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as fh:
            old = json.load(fh)
        if old.get("recipe") != recipe:
            if not overwrite:
                diff = sorted(k for k in set(recipe) | set(old.get("recipe", {}))
                              if recipe.get(k) != old.get("recipe", {}).get(k))
                raise InputError("dataset", "a new dataset name, or the recipe this folder was made with "
                                 "(to continue it)", f"{out_dir} made with other settings ({', '.join(diff)})",
                                 "Set overwrite to start it afresh, or use another name")
            shutil.rmtree(out_dir)
    elif overwrite and os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    items_dir, drop_dir = os.path.join(out_dir, "items"), os.path.join(out_dir, "discarded")
    os.makedirs(items_dir, exist_ok=True)
    os.makedirs(drop_dir, exist_ok=True)

    def done(i: int) -> bool:
        return (os.path.isfile(os.path.join(items_dir, stem(i) + ".target.png"))
                or os.path.isfile(os.path.join(drop_dir, stem(i) + ".target.png")))

    todo = [i for i in range(s.count) if not done(i)]
    pbar = progress if progress is not None else comfy.utils.ProgressBar(s.count)
    pbar.update_absolute(s.count - len(todo), s.count)
    negative = _encode(clip, s.negative)
    border = s.border_px()
    generated = 0
    check_interrupt = check_interrupt or comfy.model_management.throw_exception_if_processing_interrupted
    for start in range(0, len(todo), s.batch_size):
        check_interrupt()
        idx = todo[start:start + s.batch_size]
        caps = [grammar.caption(s.seed, i) for i in idx]
        enc = [_encode(clip, c) for c in caps]
        if len({tuple(c.shape) for c, _ in enc}) > 1:   # prompts of different token lengths: one at a time
            groups = [[j] for j in range(len(idx))]
        else:
            groups = [list(range(len(idx)))]
        for grp in groups:
            cond = torch.cat([enc[j][0] for j in grp])
            pooled = None if enc[grp[0]][1] is None else torch.cat([enc[j][1] for j in grp])
            positive = [[cond, {"pooled_output": pooled} if pooled is not None else {}]]
            neg = [[negative[0].expand(len(grp), -1, -1),
                    {"pooled_output": negative[1].expand(len(grp), -1)} if negative[1] is not None else {}]]
            latent = torch.zeros([len(grp), 4, s.height // 8, s.width // 8])
            latent = comfy.sample.fix_empty_latent_channels(model, latent)
            noise = torch.cat([comfy.sample.prepare_noise(latent[:1], item_seed(s.seed, idx[j])) for j in grp])
            samples = comfy.sample.sample(model, noise, s.steps, s.cfg, s.sampler_name, s.scheduler, positive, neg,
                                          latent, denoise=1.0, disable_pbar=True, seed=item_seed(s.seed, idx[grp[0]]))
            images = vae.decode(samples)
            images = images.reshape(-1, *images.shape[-3:])[..., :3].float().cpu().clamp(0, 1)
            masks = [largest_component(m) for m in mask_source(images)]
            for j, img, m in zip(grp, images, masks):
                i, cap = idx[j], caps[j]
                area = float(m.mean())
                reason = ("empty mask" if area < MIN_AREA else
                          f"mask touches the {border} px border" if touches_border(m, border) else None)
                folder = drop_dir if reason else items_dir
                base = os.path.join(folder, stem(i))
                _png(m, base + ".mask.png")
                if reason:
                    _text(f"{cap}\n# discarded: {reason}\n", base + ".txt")
                else:
                    _png(reference_from(img, m), base + ".reference.png")
                    _text(cap + "\n", base + ".txt")
                _png(img, base + ".target.png")   # last: an item exists once its target does
                generated += 1
                pbar.update_absolute(s.count - len(todo) + generated, s.count)

    kept = sorted(f[:-len(".target.png")] for f in os.listdir(items_dir) if f.endswith(".target.png"))
    dropped = [f for f in os.listdir(drop_dir) if f.endswith(".target.png")]
    meta = {"format": FORMAT, "version": BOOTSTRAP_VERSION, "recipe": recipe, "count": s.count,
            "kept": len(kept), "discarded": len(dropped),
            "items": "items/<stem>.target.png / .mask.png / .reference.png / .txt; item i was sampled with noise "
                     "seed recipe.seed + i (a KSampler with that seed, batch 1)"}
    _text(json.dumps(meta, indent=1) + "\n", meta_path)
    return BootstrapResult(out_dir, len(kept), len(dropped), generated, preview(out_dir, kept[:4]))


def preview(out_dir: str, stems: list[str], size: int = 128) -> torch.Tensor:
    """Rows of target | mask | reference (on a white square) for the given kept items, ``[N, size, 3 size, 3]``."""
    if not stems:
        return torch.ones(1, size, 3 * size, 3)
    from .images import subject_on_white

    rows = []
    for st in stems:
        base = os.path.join(out_dir, "items", st)
        tgt = _image(base + ".target.png", "RGB", "dataset")
        msk = _image(base + ".mask.png", "L", "dataset") if os.path.isfile(base + ".mask.png") else \
            torch.ones(tgt.shape[:2])
        ref = _image(base + ".reference.png", "RGB", "dataset")
        fit = lambda x: F.interpolate(x.permute(2, 0, 1)[None], size=(size, size), mode="bilinear",   # noqa: E731
                                      align_corners=False, antialias=True)[0].permute(1, 2, 0).clamp(0, 1)
        rows.append(torch.cat([fit(tgt), fit(msk[..., None].expand(-1, -1, 3).contiguous()),
                               subject_on_white(ref, None, size)], dim=1))
    return torch.stack(rows)
