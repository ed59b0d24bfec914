"""Subject-Diffusion location control (arXiv 2307.11410 §3.3, Eq. 3): a binary map concatenated to the noisy latent.

The map is 0 inside each subject's box (or mask) and 1 on the background; for two subjects it is the product of
the per-subject maps; it is built at pixel resolution and resized to the latent grid with nearest-neighbour
interpolation (official ``custom_dataset.py`` / ``train.py``). The UNet's first convolution then takes 4 + 1
channels (``conv_in`` with the new channel's weights initialised at zero, so an expanded model behaves exactly like
its base until trained).

ComfyUI side: the channel rides on a ``DIFFUSION_MODEL`` wrapper (an immutable value registered on a clone), which
concatenates it to the UNet's input on EVERY UNet call - conditional and unconditional rows alike, any batch size,
any area crop, rows other patches append (BootPIG's reference rows) - so no conditioning can reach the 5-channel UNet
without it. (Same channel order as ``c_concat``: after any other concatenated inputs.)
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from .attention import PatchValue, to_device
from .errors import InputError, require
from .introspect import base_model

MAX_SUBJECTS = 2
LATENT_FACTOR = 8              # pixels per latent cell for the SD family (SD1.5, SD2, SDXL)
CONV_IN = "diffusion_model.input_blocks.0.0"
WRAPPER_KEY = "personalize_subject_diffusion_location"
UNCOND_MODES = ("same", "zero")


# ------------------------------------------------------------------------------------------------------ the channel
def parse_boxes(text: str, input_name: str = "boxes") -> list[tuple[int, int, int, int]]:
    """'x, y, w, h' per line (or separated by ';'), pixels -> list of int boxes. Empty text -> []."""
    boxes = []
    for part in re.split(r"[;\n]+", text or ""):
        part = part.strip()
        if not part:
            continue
        nums = [p for p in re.split(r"[,\s]+", part.strip("()[]")) if p]
        try:
            vals = [int(round(float(v))) for v in nums]
        except (ValueError, OverflowError):  # OverflowError: 'inf'; ValueError: 'nan' or not a number
            vals = []
        require(len(vals) == 4, input_name, "one box per line as 'x, y, w, h', four finite numbers in pixels",
                repr(part))
        boxes.append(tuple(vals))
    return boxes


def check_box(box, width: int, height: int, input_name: str = "boxes") -> None:
    x, y, w, h = box
    require(w > 0 and h > 0, input_name, "boxes with positive width and height", f"{box}")
    if x < 0 or y < 0 or x + w > width or y + h > height:
        raise InputError(input_name, f"boxes inside the {width}x{height} image (0 <= x, x + w <= {width}, "
                         f"0 <= y, y + h <= {height})", f"box {tuple(box)}")


def box_to_xyxy(box, width: int, height: int) -> tuple[float, float, float, float]:
    """Pixel (x, y, w, h) -> (x1, y1, x2, y2) normalised to 0..1 (the adapters' Fourier box input)."""
    x, y, w, h = box
    return (x / width, y / height, (x + w) / width, (y + h) / height)


def mask_to_box(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """Bounding box (x, y, w, h) of mask > 0.5 in the mask's own pixels."""
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    x0, y0 = int(xs.min()), int(ys.min())
    return (x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1)


def subject_map_from_box(box, height: int, width: int) -> torch.Tensor:
    """[H, W] map at pixel resolution: 0 inside the box, 1 outside."""
    x, y, w, h = box
    m = torch.ones(height, width)
    m[y:y + h, x:x + w] = 0.0
    return m


def binary_masks(mask: torch.Tensor | None, input_name: str = "mask") -> list[torch.Tensor]:
    """MASK [B,H,W] or [H,W] -> list of binary [H,W] subject masks (1 = subject); empty masks are errors."""
    from .images import check_masks

    mask = check_masks(mask, None, input_name)
    return [] if mask is None else [(m.float() > 0.5).float() for m in mask]


def location_channel(boxes, masks, latent_h: int, latent_w: int, factor: int = LATENT_FACTOR) -> torch.Tensor:
    """The location channel [1, 1, latent_h, latent_w]: prod over subjects of (0 inside / 1 outside), each subject
    map nearest-resized to the latent grid. Boxes are in pixels of the (latent * factor) image; masks [H, W] at any
    resolution (1 = subject)."""
    H, W = latent_h * factor, latent_w * factor
    maps = [subject_map_from_box(b, H, W) for b in boxes] + [1.0 - m.float() for m in masks]
    out = torch.ones(1, 1, latent_h, latent_w)
    for m in maps:
        out = out * F.interpolate(m[None, None].float(), size=(latent_h, latent_w), mode="nearest")
    return out


def build_channel(latent: torch.Tensor, boxes_text: str = "", mask: torch.Tensor | None = None,
                  factor: int = LATENT_FACTOR) -> tuple[torch.Tensor, list, list]:
    """Validate the node inputs and build the channel. Returns (channel, boxes, masks)."""
    require(isinstance(latent, torch.Tensor) and latent.ndim == 4, "latent", "a LATENT with samples [B, C, h, w]",
            tuple(getattr(latent, "shape", ())) or type(latent).__name__)
    h, w = int(latent.shape[-2]), int(latent.shape[-1])
    boxes = parse_boxes(boxes_text, "boxes")
    for b in boxes:
        check_box(b, w * factor, h * factor, "boxes")
    masks = binary_masks(mask, "mask")
    n = len(boxes) + len(masks)
    require(n > 0, "boxes", "at least one subject: a box 'x, y, w, h' or a mask", "no box and no mask")
    require(n <= MAX_SUBJECTS, "boxes", f"at most {MAX_SUBJECTS} subjects (boxes + masks), as Subject-Diffusion",
            f"{n}")
    return location_channel(boxes, masks, h, w, factor), boxes, masks


# ------------------------------------------------------------------------------------------- the model's input width
def input_channels(model) -> int:
    """Input channels of the UNet's first convolution, object patches (Expand Input Channels) included."""
    get = getattr(model, "get_model_object", None)
    conv = get(CONV_IN) if get is not None else base_model(model).diffusion_model.input_blocks[0][0]
    return int(conv.weight.shape[1])


def output_channels(model) -> int:
    return int(base_model(model).diffusion_model.out[-1].weight.shape[0])


def expanded_conv(conv: torch.nn.Module, extra: int = 1, weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.nn.Module:
    """A NEW conv of the same class with ``extra`` more input channels: the old weights copied into the first
    channels and the new ones zero (Subject-Diffusion's conv_in init), or the given trained weight/bias."""
    w = conv.weight
    new = type(conv)(w.shape[1] + extra, w.shape[0], kernel_size=conv.kernel_size, stride=conv.stride,
                     padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                     padding_mode=conv.padding_mode, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        if weight is None:
            nw = torch.zeros(w.shape[0], w.shape[1] + extra, *w.shape[2:], dtype=w.dtype, device=w.device)
            nw[:, :w.shape[1]] = w.detach()
        else:
            require(tuple(weight.shape) == (w.shape[0], w.shape[1] + extra, *w.shape[2:]), "weights",
                    f"a conv_in weight of shape {(w.shape[0], w.shape[1] + extra, *w.shape[2:])}",
                    tuple(weight.shape))
            nw = weight.detach().to(w.device, w.dtype)
        new.weight = torch.nn.Parameter(nw.clone(), requires_grad=False)
        if conv.bias is not None:
            nb = conv.bias.detach() if bias is None else bias.detach().to(w.device, w.dtype)
            new.bias = torch.nn.Parameter(nb.clone(), requires_grad=False)
    for attr in ("comfy_cast_weights", "weight_function", "bias_function"):
        if hasattr(conv, attr):
            v = getattr(conv, attr)
            setattr(new, attr, list(v) if isinstance(v, list) else v)
    return new


def expand_model(model, extra: int = 1, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 replace: bool = False):
    """``model.clone()`` whose conv_in takes ``extra`` more channels (an object patch holding a NEW conv; the parent
    and its weights are untouched). With ``weight``/``bias`` the new conv gets those (trained) values instead."""
    import comfy.utils

    # the checkpoint's own conv_in, even while another clone's expanded conv is installed in the shared model
    # (ComfyUI applies object patches on load and keeps the originals in the shared object_patches_backup)
    conv = model.object_patches_backup.get(CONV_IN) or comfy.utils.get_attr(model.model, CONV_IN)
    if CONV_IN in model.object_patches and not replace:
        raise InputError("model", "a model whose first convolution has not been expanded yet",
                         f"a model already expanded to {int(model.object_patches[CONV_IN].weight.shape[1])} input "
                         "channels")
    if weight is not None:
        extra = int(weight.shape[1]) - int(conv.weight.shape[1])
    m = model.clone()
    m.add_object_patch(CONV_IN, expanded_conv(conv, extra, weight, bias))
    return m


# ------------------------------------------------------------------------------------------------------- the wrapper
class LocationConcat(PatchValue):
    """DIFFUSION_MODEL wrapper: concatenates the location channel to the UNet's input on every call. It runs inside
    every APPLY_MODEL wrapper, so it sees the call's final rows (BootPIG's appended reference rows included) with
    their ``cond_or_uncond`` entries (``nodes/rows.py``). ``uncond = 'zero'`` gives the negative-prompt rows an
    all-zero channel (Subject-Diffusion's unconditional branch); 'same' gives every row the map. The map is copied
    to each device once (cached): no host copy or sync per call."""

    def __init__(self, channel: torch.Tensor, uncond: str = "zero", expected_in: int = 5):
        self.channel = channel.detach().clone().cpu()
        self.uncond = uncond
        self.expected_in = expected_in
        self._on: dict = {}

    def _map(self, h: int, w: int, device, dtype) -> torch.Tensor:
        key = (h, w, str(device), dtype)
        hit = self._on.get(key)
        if hit is None:
            ch = self.channel
            if tuple(ch.shape[-2:]) != (h, w):
                ch = F.interpolate(ch, size=(h, w), mode="nearest")
            hit = self._on[key] = to_device(ch, device, dtype)
        return hit

    def rows(self, x: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        from .rows import NEGATIVE, chunk_roles, chunk_size

        b, _, h, w = x.shape
        ch = self._map(h, w, x.device, x.dtype)
        per = chunk_size(transformer_options, b) if self.uncond == "zero" else None
        if per is None:
            return ch.expand(b, 1, h, w)
        zero = torch.zeros_like(ch)
        return torch.cat([(zero if role == NEGATIVE else ch).expand(per, 1, h, w)
                          for role in chunk_roles(transformer_options)])

    def __call__(self, executor, x, timesteps=None, context=None, y=None, control=None, transformer_options={},
                 **kwargs):
        got = x.shape[1] + 1
        if got != self.expected_in:
            raise InputError("model", f"a UNet call with {self.expected_in} input channels (latent + location)",
                             f"{got} channels: another node also concatenates inputs")
        x = torch.cat([x, self.rows(x, transformer_options)], dim=1)
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


def find_location(model) -> LocationConcat | None:
    import comfy.patcher_extension as pe

    for w in model.get_wrappers(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY):
        if isinstance(w, LocationConcat):
            return w
    return None


def apply_location(model, channel: torch.Tensor, uncond: str = "zero"):
    """Clone with the location channel on every UNet call; clear error if the first conv does not take it."""
    import comfy.patcher_extension as pe

    require(uncond in UNCOND_MODES, "uncond_mask", f"one of {UNCOND_MODES}", uncond)
    latent_ch = output_channels(model)
    have = input_channels(model)
    if have != latent_ch + 1:
        raise InputError("model", f"a UNet whose first convolution takes {latent_ch + 1} channels (latent + "
                         "location), e.g. from Expand Input Channels or a Subject-Diffusion checkpoint",
                         f"a model with {have} input channels",
                         "Connect the model through 'Expand Input Channels (Subject-Diffusion)' first")
    m = model.clone()
    m.remove_wrappers_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, LocationConcat(channel, uncond, have))
    return m
