"""The toy world's mask source: a small U-Net that segments the subject of a toy-world image.

The BootPIG bootstrap pipeline needs a subject mask for every image it samples from the base model; for real
checkpoints that is SAM, in the toy world it is this segmenter, trained by ``scripts/train_toyworld.py segmenter`` on
training-generator renders (the renderer gives the masks for free; never a held-out subject), made robust to
generated images with blur / noise / colour jitter and toy-VAE round trips. Shipped with the v2 weights
(``model.SEGMENTER_PATH``, fp16, ~0.5 MB).

- ``build()``: the network (fully convolutional, ~0.25 M parameters): input [B, 3, H, W] in 0..1 (H, W multiples of
  16; any other size is padded), output mask logits [B, 1, H, W]. Trained at 128 px.
- ``load(path)``: the trained network (eval mode, float32, CPU).
- ``predict(net, images_bhwc, threshold)``: [B, H, W] float masks in {0, 1} from ComfyUI IMAGE tensors.
- ``ToySegmenterMaskSource(net)``: the mask-source object the BootPIG data nodes call: ``source(images)`` -> masks.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

WIDTHS = (16, 24, 32, 48, 64)   # channels at 1, 1/2, 1/4, 1/8, 1/16 of the input resolution
MULTIPLE = 2 ** (len(WIDTHS) - 1)


def _conv(i, o, stride=1, dilation=1):
    return nn.Sequential(nn.Conv2d(i, o, 3, stride, dilation, dilation=dilation), nn.GroupNorm(min(8, o // 4), o),
                         nn.ReLU(inplace=True))


class ToySegmenter(nn.Module):
    """U-Net: a stride-2 encoder over 5 levels (the last with a dilated conv: the subject covers up to 80 % of the
    frame, so the coarsest level sees all of it), a bilinear-upsampling decoder with skip connections, 1x1 head."""

    def __init__(self, widths=WIDTHS):
        super().__init__()
        w = widths
        self.enc = nn.ModuleList([_conv(3, w[0])])     # full resolution: one conv each way (the costly level)
        for a, b in zip(w[:-1], w[1:]):
            self.enc.append(nn.Sequential(_conv(a, b, stride=2), _conv(b, b)))
        self.mid = nn.Sequential(_conv(w[-1], w[-1], dilation=2), _conv(w[-1], w[-1], dilation=4))
        self.dec = nn.ModuleList([nn.Sequential(_conv(b + a, a), _conv(a, a)) if a != w[0] else _conv(b + a, a)
                                  for a, b in zip(reversed(w[:-1]), reversed(w[1:]))])
        self.head = nn.Conv2d(w[0], 1, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        ph, pw = (-h) % MULTIPLE, (-w) % MULTIPLE
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        skips = []
        for blk in self.enc:
            x = blk(x)
            skips.append(x)
        x = self.mid(skips.pop())
        for blk in self.dec:
            s = skips.pop()
            x = blk(torch.cat([F.interpolate(x, size=s.shape[-2:], mode="bilinear", align_corners=False), s], 1))
        return self.head(x)[..., :h, :w]


def build() -> ToySegmenter:
    return ToySegmenter()


def load(path: str) -> ToySegmenter:
    from safetensors.torch import load_file

    net = build()
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return net.eval()


def _as_nchw(images: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"toy segmenter: expected IMAGE [B, H, W, 3] in 0..1, got shape {tuple(x.shape)}")
    x = x[..., :3] if x.shape[-1] != 1 else x.expand(*x.shape[:-1], 3)
    return x.permute(0, 3, 1, 2).float()


@torch.no_grad()
def predict(net: nn.Module, images_bhwc: torch.Tensor, threshold: float = 0.5, batch: int = 16) -> torch.Tensor:
    """Subject masks [B, H, W] float32 in {0, 1} (on the CPU) of IMAGE tensors [B, H, W, 3] in 0..1 (CPU or GPU;
    the network runs where its weights are)."""
    dev = next(net.parameters()).device
    x = _as_nchw(images_bhwc)
    out = []
    for i in range(0, x.shape[0], batch):
        logits = net(x[i:i + batch].to(dev).clamp(0, 1))
        out.append((torch.sigmoid(logits[:, 0].float()) > threshold).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, *x.shape[-2:])


class ToySegmenterMaskSource:
    """A mask source (``PERSONALIZE_MASK_SOURCE``): ``source(images)`` -> subject masks [B, H, W] float32 {0, 1}."""

    def __init__(self, net: nn.Module, path: str | None = None, threshold: float = 0.5):
        self.net, self.path, self.threshold = net.eval(), path, threshold

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return predict(self.net, images, self.threshold)

    def describe(self) -> str:
        return f"toy segmenter ({os.path.basename(self.path) if self.path else 'in memory'})"

    def __repr__(self):
        return f"<ToySegmenterMaskSource: {self.describe()}>"


def mask_source(path: str | None = None) -> ToySegmenterMaskSource:
    """The shipped toy segmenter as a mask source (``toyworld.model.SEGMENTER_PATH`` unless ``path``)."""
    from . import model as tw_model

    path = path or tw_model.SEGMENTER_PATH
    return ToySegmenterMaskSource(load(path), path)
