"""Reference-image preparation shared by the techniques (BootPIG and Subject-Diffusion both want the subject on
white, cropped to the subject, padded square)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import InputError, require


def as_batch(images, input_name: str = "images") -> torch.Tensor:
    """IMAGE input ([B,H,W,C] float in 0..1, or a list of such tensors of one size) -> one [B,H,W,3] tensor."""
    if isinstance(images, (list, tuple)):
        require(len(images) > 0, input_name, "at least one image", "an empty list")
        sizes = {tuple(t.shape[-3:-1]) for t in images}
        require(len(sizes) == 1, input_name, "reference images of one size (resize them first, or use one encoder "
                "per size)", f"mixed sizes {sorted(sizes)}")
        images = torch.cat([t if t.ndim == 4 else t.unsqueeze(0) for t in images])
    require(isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[-1] in (3, 4), input_name,
            "an IMAGE batch [B, H, W, 3]", tuple(getattr(images, "shape", ())) or type(images).__name__)
    require(images.shape[0] > 0, input_name, "at least one reference image", "zero images")
    return images[..., :3]


def check_masks(mask, images: torch.Tensor | None = None, input_name: str = "mask") -> torch.Tensor | None:
    """MASK input ([B,H,W] or [H,W]) -> [B,H,W] float (None without a mask). With ``images`` the masks are matched to
    the image batch: of the image size, one per image or one for all. Every mask must mark something (some pixel
    above 0.5, the threshold every user of a mask applies)."""
    if mask is None:
        return None
    require(isinstance(mask, torch.Tensor) and mask.ndim in (2, 3), input_name, "a MASK [B, H, W]",
            tuple(getattr(mask, "shape", ())) or type(mask).__name__)
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if images is not None:
        b, h, w = images.shape[:3]
        require(tuple(mask.shape[-2:]) == (h, w), input_name, f"masks of the image size {h}x{w}",
                f"{mask.shape[-2]}x{mask.shape[-1]}")
        require(mask.shape[0] in (1, b), input_name, f"1 or {b} masks (one per reference image)", f"{mask.shape[0]}")
        if mask.shape[0] == 1 and b > 1:
            mask = mask.expand(b, h, w)
    for i in range(mask.shape[0]):
        if not bool((mask[i] > 0.5).any()):
            raise InputError(input_name, "a mask that marks the subject (some pixels > 0.5)",
                             f"an empty mask for image {i}")
    return mask


def subject_on_white(image: torch.Tensor, mask: torch.Tensor | None, size: int, crop: bool = True) -> torch.Tensor:
    """One [H,W,3] image -> [size,size,3]: background white (where mask is 0), cropped to the subject, padded to a
    square with white, resized. Without a mask the image is taken as already showing the subject on white."""
    img = image.float()
    if mask is not None:
        m = mask.float().clamp(0, 1).unsqueeze(-1)
        img = img * m + (1.0 - m)
        if crop:
            ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
            if len(ys) > 0:
                img = img[int(ys.min()):int(ys.max()) + 1, int(xs.min()):int(xs.max()) + 1]
    h, w = img.shape[:2]
    s = max(h, w)
    canvas = torch.ones(s, s, 3, dtype=img.dtype)
    top, left = (s - h) // 2, (s - w) // 2
    canvas[top:top + h, left:left + w] = img
    out = F.interpolate(canvas.permute(2, 0, 1).unsqueeze(0), size=(size, size), mode="bicubic",
                        align_corners=False, antialias=True)
    return out.squeeze(0).permute(1, 2, 0).clamp(0, 1)


def fit_latent(latent: torch.Tensor, h: int, w: int, fill: torch.Tensor) -> torch.Tensor:
    """Square reference latents [N,C,s,s] -> [N,C,h,w]: resized to the shorter side and padded with ``fill``
    (the latent of white, [C]) to the generation's aspect, as BootPIG pads references with white."""
    n, c, s, s2 = latent.shape
    if (s, s2) == (h, w):
        return latent
    m = min(h, w)
    small = latent if (s, s2) == (m, m) else F.interpolate(latent, size=(m, m), mode="bilinear", align_corners=False)
    if (m, m) == (h, w):
        return small
    out = fill.to(latent.dtype).view(1, c, 1, 1).expand(n, c, h, w).clone()
    top, left = (h - m) // 2, (w - m) // 2
    out[:, :, top:top + m, left:left + m] = small
    return out


def prepare_pixels(images, resolution: int) -> torch.Tensor:
    """Center crop to square and resize (area) to resolution: [N, res, res, 3]."""
    import comfy.utils

    out = []
    for im in images:
        x = im[..., :3].float().movedim(-1, 0).unsqueeze(0)
        x = comfy.utils.common_upscale(x, resolution, resolution, "area", "center")
        out.append(x.squeeze(0).movedim(0, -1).clamp(0, 1))
    return torch.stack(out)
