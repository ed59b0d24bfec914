"""Mask sources: one subject mask per image, for pipelines that segment many images (the BootPIG bootstrap).

A mask source is a callable object ``source(images) -> masks``: IMAGE ``[B, H, W, 3]`` floats in 0..1 (any device)
to ``[B, H, W]`` float32 masks of 0/1 on the CPU. Node type ``PERSONALIZE_MASK_SOURCE``. Two ship with the pack:

- ``SAMMaskSource``: Segment Anything (``nodes/sam.py``) on each image, no prompt: the most central mask of the
  automatic generator, holes filled (the paper used SAM prompted with the object phrase; there is no text-prompted
  SAM in the pack, and the central mask is what Subject-Diffusion's own pipeline keeps);
- the toy world's segmenter (``toyworld/segmenter.py``), trained on toy renders, whose masks are free there.
"""
from __future__ import annotations

import torch

from .errors import InputError, require

TYPE = "PERSONALIZE_MASK_SOURCE"


class MaskSource:
    """Base class: subclasses implement ``masks_of`` for a checked BHWC batch."""

    def describe(self) -> str:
        return type(self).__name__

    def masks_of(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        require(isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[-1] >= 3, "images",
                "an IMAGE batch [B, H, W, 3]", getattr(images, "shape", type(images).__name__))
        out = self.masks_of(images[..., :3])
        return check_output(out, images, self.describe())


def check_output(masks, images: torch.Tensor, who: str) -> torch.Tensor:
    """A mask source's result as float32 0/1 ``[B, H, W]`` on the CPU, or an error naming the source."""
    b, h, w = images.shape[:3]
    if not (isinstance(masks, torch.Tensor) and tuple(masks.shape) == (b, h, w)):
        raise RuntimeError(f"Personalize: mask source {who} returned {getattr(masks, 'shape', type(masks).__name__)}"
                           f" for {b} images of {w}x{h}; expected masks [{b}, {h}, {w}]")
    masks = masks.detach().float().cpu()
    if not torch.isfinite(masks).all():
        raise RuntimeError(f"Personalize: mask source {who} returned NaN/inf masks")
    return (masks > 0.5).float()


def check_source(value, input_name: str = "mask_source") -> None:
    require(callable(value) and not isinstance(value, torch.Tensor), input_name,
            "a mask source (Mask Source (SAM), or Toy World Segmenter)", type(value).__name__)


class SAMMaskSource(MaskSource):
    """Segment Anything on each image (no prompt: the most central automatic mask, holes filled)."""

    def __init__(self, sam, points_per_side: int = 16):
        self.sam = sam
        self.points_per_side = int(points_per_side)

    def describe(self) -> str:
        enc = getattr(self.sam, "image_encoder", None)
        dim = getattr(getattr(enc, "patch_embed", None), "proj", None)
        width = f" ViT width {dim.out_channels}" if dim is not None else ""
        return f"SAM{width} (most central automatic mask, points_per_side {self.points_per_side})"

    def masks_of(self, images: torch.Tensor) -> torch.Tensor:
        from . import sam

        out = []
        for img in images:
            try:
                out.append(sam.segment(self.sam, img, points_per_side=self.points_per_side))
            except InputError:   # SAM found nothing: an empty mask, which the caller discards
                out.append(torch.zeros(img.shape[:2]))
        return torch.stack(out)
