"""Offline scorers for the toy world (stand-ins for DreamBench's DINO / CLIP-I and CLIP-T).

- ``ClassBgNet``: a small CNN with two heads, the subject's class and the background; prompt fidelity = accuracy of
  generated images against their prompt's class and background.
- ``InstanceNet``: a small CNN embedding (64-d, unit norm) trained contrastively (InfoNCE) so that one instance
  under different pose / scale / background is close; subject fidelity = mean cosine similarity between generated
  images and the subject's reference renders (as DINO in DreamBench: whole images, all pairs).

Both are trained on toy renders by ``scripts/train_toyworld.py scorers`` on instances drawn at random (never the
held-out subjects) and ship in ``weights/toyworld/scorers.safetensors``. Inputs: float images (N, H, W, 3) in [0, 1]
(ComfyUI's IMAGE layout) or (N, 3, H, W) tensors; 64x64 (other sizes are resized).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import scenes
from .model import WEIGHTS_DIR

# the scorers' input size (px), the same in both worlds: images of any other size are resampled to it (``as_nchw``);
# the real renders' ceiling is the same at 64 and 128 px (0.893 / 0.895)
INPUT_SIZE = 64


def _trunk(width=32):
    def blk(i, o, s):
        return [nn.Conv2d(i, o, 3, s, 1), nn.GroupNorm(8, o), nn.ReLU()]

    return nn.Sequential(*blk(3, width, 2), *blk(width, 2 * width, 1), *blk(2 * width, 2 * width, 2),
                         *blk(2 * width, 4 * width, 2), *blk(4 * width, 4 * width, 2))


def _pool(h):
    return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)


class ClassBgNet(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.trunk = _trunk(width)
        self.cls_head = nn.Linear(8 * width, len(scenes.CLASSES))
        self.bg_head = nn.Linear(8 * width, len(scenes.BACKGROUNDS))

    def forward(self, x):
        h = _pool(self.trunk(x))
        return self.cls_head(h), self.bg_head(h)


class InstanceNet(nn.Module):
    def __init__(self, width=32, dim=64):
        super().__init__()
        self.trunk = _trunk(width)
        self.head = nn.Sequential(nn.Linear(8 * width, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, dim))

    def forward(self, x):
        return F.normalize(self.head(_pool(self.trunk(x))), dim=-1)


def augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Blur (down/up-sampling), noise and brightness/contrast jitter: makes the scorers read blurry generations."""
    n = x.shape[0]
    small = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True), size=x.shape[-2:],
                          mode="bilinear")
    w = torch.from_numpy(rng.uniform(0, 1, n) * (rng.random(n) < 0.6)).float().view(-1, 1, 1, 1)
    x = x * (1 - w) + small * w
    gain = torch.from_numpy(rng.uniform(0.85, 1.15, (n, 1, 1, 1))).float()
    bias = torch.from_numpy(rng.uniform(-0.06, 0.06, (n, 1, 1, 1))).float()
    noise = torch.randn_like(x) * torch.from_numpy(rng.uniform(0, 0.05, (n, 1, 1, 1))).float()
    return (x * gain + bias + noise).clamp(0, 1)


def as_nchw(images) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images).float()
    if x.ndim == 3:
        x = x[None]
    if x.shape[-1] in (3, 4) and x.shape[1] not in (3, 4):
        x = x[..., :3].permute(0, 3, 1, 2)
    if x.shape[-1] != INPUT_SIZE or x.shape[-2] != INPUT_SIZE:
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True)
    return x.contiguous()


class Scorers:
    """The trained scorers: ``classify``, ``embed``, ``subject_fidelity``, ``prompt_fidelity``."""

    def __init__(self, path: str | None = None):
        from safetensors.torch import load_file

        sd = load_file(path or os.path.join(WEIGHTS_DIR, "scorers.safetensors"))
        self.cls_net, self.emb_net = ClassBgNet(), InstanceNet()
        self.cls_net.load_state_dict({k[11:]: v.float() for k, v in sd.items() if k.startswith("classifier.")})
        self.emb_net.load_state_dict({k[9:]: v.float() for k, v in sd.items() if k.startswith("embedder.")})
        self.cls_net.eval()
        self.emb_net.eval()

    @torch.no_grad()
    def classify(self, images):
        """(class indices, background indices) of each image."""
        lc, lb = self.cls_net(as_nchw(images))
        return lc.argmax(1), lb.argmax(1)

    @torch.no_grad()
    def embed(self, images) -> torch.Tensor:
        return self.emb_net(as_nchw(images))

    def subject_fidelity(self, generated, references) -> float:
        """Mean cosine similarity over all (generated, reference) pairs (DreamBench's DINO protocol)."""
        return float((self.embed(generated) @ self.embed(references).t()).mean())

    def prompt_hits(self, generated, cls: str | list, background: str | list) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: is its class / background the prompt's (two bool tensors [N]), from one classifier pass."""
        n = as_nchw(generated).shape[0]
        cls = [cls] * n if isinstance(cls, str) else list(cls)
        background = [background] * n if isinstance(background, str) else list(background)
        pc, pb = self.classify(generated)
        yc = torch.tensor([scenes.CLASSES.index(c) for c in cls])
        yb = torch.tensor([list(scenes.BACKGROUNDS).index(b) for b in background])
        return pc == yc, pb == yb

    def prompt_fidelity(self, generated, cls: str | list, background: str | list) -> dict:
        """Accuracy of the images against their prompt: class, background, and both (mean of the two)."""
        hc, hb = self.prompt_hits(generated, cls, background)
        ac, ab = hc.float().mean().item(), hb.float().mean().item()
        return {"class": ac, "background": ab, "prompt": (ac + ab) / 2}
