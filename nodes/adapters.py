"""Subject-Diffusion's trainable parts besides the UNet (arXiv 2307.11410 §3.3; official ``modules.py`` and
``third_party/attention.py``), and the weights value that carries them.

- ``MLP``: LayerNorm -> Linear -> GELU -> Linear. The CLS MLP maps the reference's projected CLIP-vision embedding
  to one text-token embedding (it replaces the placeholder token "sks" before the text encoder).
- ``GroundingNet``: per reference patch token, ``h_e = MLP([v ; Fourier(box)])`` (8 frequencies, temperature 100,
  sin/cos of the 4 box coordinates = 64-d); absent objects use learned null image / position features (zero at
  init); with ``use_bbox = False`` (the official test default) the position is replaced by the null feature unless
  there is more than one object.
- Gated self-attention adapters, one per BasicTransformerBlock, between attn1 and attn2 - ComfyUI's own
  ``comfy.gligen.GatedSelfAttentionDense`` module:
  ``x <- x + s*tanh(a_attn)*SelfAttn(LN([x ; Linear(h_e)]))[:N]``, ``x <- x + s*tanh(a_dense)*FF(LN(x))``
  with ``a_attn = a_dense = 0`` at init, so an untrained adapter changes nothing (bit-exact: tanh(0) = 0).

In ComfyUI the adapters run as a ``middle_patch`` (the hook ComfyUI's GLIGEN uses, right after attn1's residual);
the adapter modules live in their own ModelPatcher returned by the patch's ``models()`` so ComfyUI loads and
offloads them with the UNet. Conditional rows get the reference tokens, unconditional rows the null objects (the
official unconditional branch gets "zero objects").
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .attention import PatchValue, to_device
from .errors import InputError, require
from .introspect import BlockKey, attention_module, base_model, family, transformer_blocks

FOURIER_FREQS = 8
FOURIER_TEMPERATURE = 100
HIDDEN = 1024                  # official GroundingNet(1280, 1024, 1024) and MLP(1024, 1024, 1024)
FORMAT = "personalize.subject_diffusion.v1"


class MLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int):
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(self.layernorm(x))))


def fourier(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] normalised xyxy -> [..., 64]: sin and cos of each coordinate times 100^(k/8), k = 0..7 (ComfyUI's
    GLIGEN ``FourierEmbedder`` layout: per frequency, sin of the 4 coordinates then cos)."""
    from comfy.gligen import FourierEmbedder

    return FourierEmbedder(num_freqs=FOURIER_FREQS, temperature=FOURIER_TEMPERATURE)(boxes.float())


class GroundingNet(nn.Module):
    def __init__(self, vision_width: int, out_dim: int = HIDDEN, hidden_dim: int = HIDDEN, num_tokens: int = 256):
        super().__init__()
        self.position_dim = FOURIER_FREQS * 2 * 4
        self.num_tokens = num_tokens
        self.mlp = MLP(vision_width + self.position_dim, out_dim, hidden_dim)
        self.null_image = nn.Parameter(torch.zeros(num_tokens, vision_width))
        self.null_position = nn.Parameter(torch.zeros(self.position_dim))

    def forward(self, tokens: torch.Tensor, present: torch.Tensor, boxes: torch.Tensor, use_bbox: bool = False):
        """tokens [B, K, T, vw], present [B, K] bool, boxes [B, K, 4] (normalised xyxy) -> [B, K*T, out]."""
        b, k, t, vw = tokens.shape
        p = present.view(b, k, 1, 1).to(tokens.dtype)
        img = tokens * p + (1 - p) * self.null_image.to(tokens.dtype)
        pos_on = present if use_bbox else present & (present.sum(dim=1, keepdim=True) > 1)
        q = pos_on.view(b, k, 1).to(tokens.dtype)
        pos = fourier(boxes).to(tokens.dtype) * q + (1 - q) * self.null_position.to(tokens.dtype)
        pos = pos.unsqueeze(2).expand(b, k, t, self.position_dim)
        return self.mlp(torch.cat([img, pos], dim=-1)).reshape(b, k * t, -1)


def _default_init_(module: nn.Module, seed: int) -> None:
    """PyTorch's default init for ComfyUI ops modules (which skip it), seeded; adapter gates stay exactly 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in module.modules():
            if isinstance(m, nn.Linear):
                nn.Linear.reset_parameters(m)
            elif isinstance(m, nn.LayerNorm):
                nn.LayerNorm.reset_parameters(m)
    for name, p in module.named_parameters():
        if name.endswith("alpha_attn") or name.endswith("alpha_dense"):
            with torch.no_grad():
                p.zero_()


class SubjectModules(nn.Module):
    """adapters (one GatedSelfAttentionDense per transformer block, forward order), grounding net, CLS MLP."""

    def __init__(self, config: dict):
        super().__init__()
        from comfy.gligen import GatedSelfAttentionDense

        self.config = config
        hid = config["hidden"]
        self.adapters = nn.ModuleList(GatedSelfAttentionDense(width, hid, heads, width // heads)
                                      for (_, _, _, width, heads) in config["blocks"])
        self.grounding = GroundingNet(config["vision_width"], hid, hid, config["vision_tokens"])
        self.text_mlp = MLP(config["embed_dim"], config["text_width"], hid)


def block_table(model) -> list[list]:
    """[name, id, index, width, heads] of every transformer block, forward order."""
    out = []
    for key in transformer_blocks(model):
        attn = attention_module(model, key, "attn1")
        out.append([key.name, key.id, key.index, int(attn.to_q.in_features), int(attn.heads)])
    return out


def text_width(model) -> int:
    return int(base_model(model).model_config.unet_config.get("context_dim"))


def make_config(model, vision_width: int = 1280, vision_tokens: int = 256, embed_dim: int = 1024,
                hidden: int = HIDDEN, text_dim: int | None = None) -> dict:
    fam = family(model, "model")
    return {"format": FORMAT, "family": fam, "vision_width": int(vision_width), "vision_tokens": int(vision_tokens),
            "embed_dim": int(embed_dim), "hidden": int(hidden),
            "text_width": int(text_dim if text_dim is not None else text_width(model)), "blocks": block_table(model)}


def vision_dims(clip_vision) -> tuple[int, int, int]:
    """(patch-token width, number of patch tokens, projected embedding width) of a ComfyUI CLIP_VISION model."""
    m = clip_vision.model
    proj = getattr(m, "visual_projection", None)
    require(proj is not None, "clip_vision", "a CLIP vision model with a projection (e.g. ViT-H/14)",
            type(m).__name__)
    width = int(proj.weight.shape[1])
    emb = m.vision_model.embeddings
    tokens = int(emb.position_embedding.weight.shape[0]) - (1 if getattr(emb, "class_embedding", None) is not None
                                                             else 0)
    return width, tokens, int(proj.weight.shape[0])


@dataclass(frozen=True, eq=False)
class SubjectWeights:
    """The SUBJECT_DIFFUSION_WEIGHTS value: config, the modules, the trained UNet tensors (conv_in, attn2 k/v, keyed
    like ComfyUI's diffusion_model state dict) and whether anything was trained. Immutable; shared by clones."""

    config: dict
    modules: SubjectModules
    unet: dict = field(default_factory=dict)
    trained: bool = False
    steps: int = 0

    def __deepcopy__(self, memo):
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {k: v for k, v in self.modules.state_dict().items()}
        sd.update({"unet." + k: v for k, v in self.unet.items()})
        return sd

    def metadata(self) -> dict:
        return {"format": FORMAT, "config": json.dumps(self.config), "trained": "true" if self.trained else "false",
                "steps": str(self.steps)}

    def patcher(self):
        import comfy.model_management as mm
        import comfy.model_patcher

        p = getattr(self, "_patcher", None)
        if p is None:
            p = comfy.model_patcher.ModelPatcher(self.modules, load_device=mm.get_torch_device(),
                                                 offload_device=mm.unet_offload_device())
            object.__setattr__(self, "_patcher", p)
        return p


def init_weights(model, vision_width=1280, vision_tokens=256, embed_dim=1024, hidden=HIDDEN, seed=0) -> SubjectWeights:
    """Zero-initialised Subject-Diffusion parts for this model: adapter gates 0 (identical output until trained),
    the MLPs with PyTorch's default init (seeded), null features 0. Marked untrained."""
    cfg = make_config(model, vision_width, vision_tokens, embed_dim, hidden)
    mods = SubjectModules(cfg)
    _default_init_(mods, seed)
    mods.requires_grad_(False).eval()
    return SubjectWeights(cfg, mods, {}, False, 0)


def check_model(weights: SubjectWeights, model, input_name: str = "weights") -> None:
    have = block_table(model)
    want = weights.config["blocks"]
    if have != want:
        raise InputError(input_name, f"Subject-Diffusion weights made for this model's architecture ({len(have)} "
                         f"transformer blocks, widths {sorted({b[3] for b in have})})",
                         f"weights for {len(want)} blocks, widths {sorted({b[3] for b in want})}")


def load_weights(path: str, input_name: str = "weights_name") -> SubjectWeights:
    from . import weights_io

    tensors, meta = weights_io.load(path, input_name=input_name)
    if meta.get("format") != FORMAT or "config" not in meta:
        raise InputError(input_name, f"a Subject-Diffusion weights file of this pack (metadata format {FORMAT}), "
                         "as saved by the Subject-Diffusion Trainer", f"metadata {sorted(meta)}")
    try:
        cfg = json.loads(meta["config"])
        mods = SubjectModules(cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(input_name, "a Subject-Diffusion weights file with a readable config (metadata)",
                         f"{os.path.basename(path)}: {type(e).__name__} {e}"[:200]) from None
    expected = list(mods.state_dict().keys())
    weights_io.check_keys(tensors.keys(), expected, "Subject-Diffusion weights file", input_name)
    try:
        mods.load_state_dict({k: tensors[k] for k in expected}, strict=True)
    except RuntimeError as e:
        raise InputError(input_name, "Subject-Diffusion weights whose tensors fit their config",
                         f"{os.path.basename(path)}: {str(e).splitlines()[-1].strip()}"[:200]) from None
    mods.requires_grad_(False).eval()
    unet = {k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")}
    return SubjectWeights(cfg, mods, unet, meta.get("trained") == "true", int(meta.get("steps", "0") or 0))


# ----------------------------------------------------------------------------------------- the UNet-side weights
def apply_unet(model, weights: SubjectWeights):
    """Clone of ``model`` with the trained conv_in (object patch) and attn2 k/v ('set' weight patches)."""
    from .location import expand_model

    m = model.clone()
    if not weights.unet:
        return m
    sd = base_model(model).diffusion_model.state_dict()
    patches = {}
    for k, v in weights.unet.items():
        if k.startswith("input_blocks.0.0."):
            continue
        if k not in sd or tuple(sd[k].shape) != tuple(v.shape):
            raise InputError("weights", "UNet tensors that match this model", f"'{k}' "
                             f"{'missing from the model' if k not in sd else f'of shape {tuple(v.shape)}'}")
        patches["diffusion_model." + k] = ("set", (v,))
    if patches:
        m.add_patches(patches, 1.0, 1.0)
    if "input_blocks.0.0.weight" in weights.unet:
        m = expand_model(m, weight=weights.unet["input_blocks.0.0.weight"],
                         bias=weights.unet.get("input_blocks.0.0.bias"), replace=True)
    return m


# ------------------------------------------------------------------------------------------------ the adapter patch
def gated(adapter, x: torch.Tensor, objs: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """GLIGEN's GatedSelfAttentionDense forward with an explicit scale (beta) instead of the module attribute."""
    n = x.shape[1]
    o = adapter.linear(objs)
    x = x + scale * torch.tanh(adapter.alpha_attn) * adapter.attn(adapter.norm1(torch.cat([x, o], dim=1)))[:, :n]
    return x + scale * torch.tanh(adapter.alpha_dense) * adapter.ff(adapter.norm2(x))


def row_kinds(extra_options: dict, batch: int) -> list[int]:
    """Per row of the call: 1 for negative-prompt rows (they get the null objects), 0 otherwise (conditional rows
    and BootPIG's reference rows, which carry the reference prompt) - the pack's row contract (``nodes/rows.py``)."""
    from .rows import row_is_uncond

    return [1 if u else 0 for u in row_is_uncond(extra_options, batch)]


class AdapterPatch(PatchValue):
    """middle_patch running the gated self-attention adapter of each transformer block.

    Per block it neither syncs with the device nor copies from the host: the object tokens are copied to each
    device once (cached), rows are chosen by the call's ``cond_or_uncond`` (Python lists), and a start/end range is
    a gate computed on the device from the call's sigma (0 outside: ``x + 0 * ...`` is exactly ``x``)."""

    def __init__(self, weights: SubjectWeights, objs: torch.Tensor, null_objs: torch.Tensor, scale: float = 1.0,
                 sigma_start: float = math.inf, sigma_end: float = 0.0):
        self.weights = weights
        self.index = {BlockKey(b[0], b[1], b[2]): i for i, b in enumerate(weights.config["blocks"])}
        self.objs = objs.detach().clone()            # [1, K*T, hidden] reference tokens
        self.null_objs = null_objs.detach().clone()  # [1, K*T, hidden] "zero objects"
        self.scale = float(scale)
        self.sigma_start = sigma_start
        self.sigma_end = sigma_end
        self._on: dict = {}

    @property
    def full_range(self) -> bool:
        return self.sigma_start >= 1e8 and self.sigma_end <= 0.0

    def models(self) -> list:
        return [self.weights.patcher()]

    def tokens(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (str(device), dtype)
        hit = self._on.get(key)
        if hit is None:
            hit = self._on[key] = (to_device(self.objs, device, dtype), to_device(self.null_objs, device, dtype))
        return hit

    def __call__(self, x, extra_options):
        from .rows import NEGATIVE, chunk_roles, chunk_size

        i = self.index.get(BlockKey.from_options(extra_options))
        if i is None or self.scale == 0.0:
            return x
        adapter = self.weights.modules.adapters[i]
        objs, null = self.tokens(adapter.linear.weight.device, x.dtype)
        b = x.shape[0]
        per = chunk_size(extra_options, b)
        if per is None:
            rows = objs.expand(b, -1, -1)
        else:
            rows = torch.cat([(null if role == NEGATIVE else objs).expand(per, -1, -1)
                              for role in chunk_roles(extra_options)])
        scale = self.scale
        sig = extra_options.get("sigmas")
        if not self.full_range and isinstance(sig, torch.Tensor):
            s0 = sig.reshape(-1)[:1]
            scale = ((s0 >= self.sigma_end) & (s0 <= self.sigma_start)).to(x.dtype) * self.scale
        return gated(adapter, x, rows, scale).to(x.dtype)


def adapter_tokens(weights: SubjectWeights, tokens: torch.Tensor, boxes: torch.Tensor, use_bbox: bool):
    """Reference patch tokens [K, T, vw] + normalised boxes [K, 4] -> (objs, null objs), each [1, K*T, hidden]."""
    g = weights.modules.grounding
    k = tokens.shape[0]
    p = next(g.parameters())
    tok = tokens.unsqueeze(0).to(p.device, p.dtype)
    bx = boxes.unsqueeze(0).to(p.device, p.dtype)
    with torch.no_grad():
        objs = g(tok, torch.ones(1, k, dtype=torch.bool, device=p.device), bx, use_bbox)
        null = g(tok, torch.zeros(1, k, dtype=torch.bool, device=p.device), bx, use_bbox)
    return objs.cpu(), null.cpu()


def apply_adapters(model, weights: SubjectWeights, tokens: torch.Tensor, boxes: torch.Tensor, use_bbox: bool = False,
                   scale: float = 1.0, sigma_start: float = math.inf, sigma_end: float = 0.0):
    check_model(weights, model)
    objs, null = adapter_tokens(weights, tokens, boxes, use_bbox)
    m = model.clone()
    m.set_model_patch(AdapterPatch(weights, objs, null, scale, sigma_start, sigma_end), "middle_patch")
    return m
