"""LoRA modules for training on ComfyUI's own UNet / CLIP modules, and the kohya file format.

- ``trainable_copy(module)``: a structural copy of a module tree (new module objects) whose weights are shared with
  the original when they are ordinary tensors and cloned when they are inference tensors (ComfyUI 0.3.75 loads
  checkpoints under ``torch.inference_mode``; inference tensors cannot be saved for backward). Wrapping layers of
  the copy never touches the original model.
- ``LoRALinear`` / ``LoRAConv1x1``: ``y = base(x) + up(down(x)) * alpha / rank`` (kohya init: down kaiming-uniform,
  up zero, so a fresh LoRA changes nothing).
- ``unet_target_names`` / ``text_encoder_target_names``: the target layers, named by their kohya keys, the naming rule
  of kohya's sd-scripts (``networks/lora.py``: ``"lora_unet_" + module path`` with ``.`` -> ``_``) over the UNet that
  kohya builds for each family:
  - SD1.5 / SD2: diffusers' ``UNet2DConditionModel`` paths (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``),
    text encoder ``lora_te_text_model_encoder_layers_<i>_<layer>``;
  - SDXL: kohya's ``SdxlUNet2DConditionModel``, whose module paths are the LDM (original checkpoint) paths
    (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), text encoders ``lora_te1_`` / ``lora_te2_``.
  ComfyUI's ``LoraLoader`` maps both UNet namings (``comfy.lora.model_lora_keys_unet``).
- ``state_dict`` / ``load_into``: ``<key>.lora_down.weight``, ``<key>.lora_up.weight``, ``<key>.alpha``.
"""
from __future__ import annotations

import math
import re
from typing import Iterable

import torch
import torch.nn.functional as F

from .errors import InputError

UNET_TARGETS = {
    # diffusers' train_dreambooth_lora.py (PEFT): the attention projections
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    # kohya networks/lora.py: every Linear / 1x1 Conv inside the transformer blocks
    "transformer": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"),
}
TE_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
TE_PREFIXES = {"sd15": {"clip_l": "lora_te"}, "sd2": {"clip_h": "lora_te"},
               "sdxl": {"clip_l": "lora_te1", "clip_g": "lora_te2"}}


def trainable_copy(module: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """New module objects over the same weights, all frozen (``requires_grad=False``): the pack's ``frozen_copy``
    (``nodes/frozen_weights.py``; inference tensors aliased, not copied; cast only where ``dtype`` asks). The
    original's parameters are not touched."""
    from .frozen_weights import frozen_copy

    return frozen_copy(module, (), frozen_dtype=dtype)[0]


class _LoRABase(torch.nn.Module):
    def __init__(self, base: torch.nn.Module, rank: int, alpha: float, down: torch.Tensor, up: torch.Tensor):
        super().__init__()
        self.base = base
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scale = self.alpha / self.rank
        self.lora_down = torch.nn.Parameter(down)
        self.lora_up = torch.nn.Parameter(up)

    @property
    def weight(self):  # some callers read layer.weight (dtype / shape checks)
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias


class LoRALinear(_LoRABase):
    def forward(self, x):
        h = F.linear(x.to(self.lora_down.dtype) if not torch.is_autocast_enabled() else x, self.lora_down)
        return self.base(x) + (F.linear(h, self.lora_up) * self.scale).to(x.dtype)


class LoRAConv1x1(_LoRABase):
    def forward(self, x):
        h = F.conv2d(x.to(self.lora_down.dtype) if not torch.is_autocast_enabled() else x, self.lora_down)
        return self.base(x) + (F.conv2d(h, self.lora_up) * self.scale).to(x.dtype)


def _layer_dims(layer: torch.nn.Module) -> tuple[int, int]:
    w = layer.weight
    return int(w.shape[1]), int(w.shape[0])  # (in, out)


def _is_target(layer) -> bool:
    if isinstance(layer, torch.nn.Linear):
        return True
    return isinstance(layer, torch.nn.Conv2d) and tuple(layer.kernel_size) == (1, 1) and layer.groups == 1


def make_lora(layer: torch.nn.Module, rank: int, alpha: float, generator: torch.Generator) -> _LoRABase:
    """kohya's init: down = kaiming_uniform(a=sqrt(5)) (the nn.Linear default), up = 0."""
    fan_in, fan_out = _layer_dims(layer)
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform with a=sqrt(5): gain*sqrt(3/fan_in) = 1/sqrt(fan_in)
    device = layer.weight.device
    with torch.inference_mode(False):
        down = (torch.rand(rank, fan_in, generator=generator, dtype=torch.float32) * 2 - 1) * bound
        up = torch.zeros(fan_out, rank, dtype=torch.float32)
        if isinstance(layer, torch.nn.Conv2d):
            return LoRAConv1x1(layer, rank, alpha, down.view(rank, fan_in, 1, 1).to(device),
                               up.view(fan_out, rank, 1, 1).to(device))
        return LoRALinear(layer, rank, alpha, down.to(device), up.to(device))


def _get(root: torch.nn.Module, path: str) -> torch.nn.Module:
    return root.get_submodule(path)


def _set(root: torch.nn.Module, path: str, new: torch.nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def kohya_unet_key(path: str) -> str:
    """kohya's key for a UNet module path (sd-scripts networks/lora.py: prefix + path, dots to underscores)."""
    return "lora_unet_" + path.replace(".", "_")


def uses_ldm_names(unet_config: dict) -> bool:
    """True for SDXL UNets (context_dim 2048: SDXL base and its fine-tunes/inpaint variants), whose kohya keys are
    LDM paths; False for SD1.5 (768) and SD2 (1024), whose kohya keys are diffusers paths."""
    return unet_config.get("context_dim") == 2048


def unet_target_names(unet: torch.nn.Module, unet_config: dict, targets: str = "attention") -> dict[str, str]:
    """{ldm module path: kohya key} for the targeted layers of a ComfyUI UNet, in module order.

    SD1.5 / SD2: ``lora_unet_<diffusers path>`` (via ``comfy.utils.unet_to_diffusers``); SDXL: ``lora_unet_<ldm
    path>``, as kohya's sd-scripts name them for each family."""
    import comfy.utils
    from comfy.ldm.modules.attention import SpatialTransformer

    if targets not in UNET_TARGETS:
        raise InputError("targets", f"one of {tuple(UNET_TARGETS)}", repr(targets))
    if uses_ldm_names(unet_config):
        to_diffusers = {}
    else:
        to_diffusers = {v[:-len(".weight")]: k[:-len(".weight")]
                        for k, v in comfy.utils.unet_to_diffusers(unet_config).items() if k.endswith(".weight")}
    suffixes = UNET_TARGETS[targets]
    names: dict[str, str] = {}
    for tname, tmod in unet.named_modules():
        if not isinstance(tmod, SpatialTransformer):
            continue
        for sub, layer in tmod.named_modules():
            if not sub or not _is_target(layer):
                continue
            if not any(sub == s or sub.endswith("." + s) for s in suffixes):
                continue
            if sub.count(".") > 0 and not sub.startswith("transformer_blocks."):
                continue
            path = f"{tname}.{sub}"
            names[path] = kohya_unet_key(to_diffusers.get(path, path))
    return names


def text_encoder_target_names(te: torch.nn.Module, family: str) -> dict[str, str]:
    """{module path inside comfy's cond_stage_model: kohya key} for CLIP attention and MLP layers."""
    prefixes = TE_PREFIXES.get(family, {})
    names = {}
    pat = re.compile(r"^(clip_[lgh])\.transformer\.text_model\.encoder\.layers\.(\d+)\.(.+)$")
    for path, layer in te.named_modules():
        m = pat.match(path)
        if not m or m.group(1) not in prefixes or m.group(3) not in TE_TARGETS:
            continue
        names[path] = f"{prefixes[m.group(1)]}_text_model_encoder_layers_{m.group(2)}_{m.group(3).replace('.', '_')}"
    return names


def check_rank(root: torch.nn.Module, names: Iterable[str], rank: int, input_name: str = "rank") -> None:
    names = list(names)
    if not names:
        raise InputError("targets", "a model with layers to train", "no matching layers")
    smallest = min(min(_layer_dims(_get(root, n))) for n in names)
    if not (isinstance(rank, int) and 1 <= rank <= smallest):
        raise InputError(input_name, f"an integer from 1 to {smallest} (the width of the smallest trained layer)",
                         rank, hint="LoRA rank 4-32 is usual")


def inject(root: torch.nn.Module, names: dict[str, str], rank: int, alpha: float, seed: int) -> dict[str, _LoRABase]:
    """Replace each named layer of ``root`` (a trainable copy) by a LoRA wrapper; returns {kohya key: wrapper}."""
    g = torch.Generator().manual_seed(int(seed))
    out = {}
    for path in names:  # insertion order = module order: deterministic init
        layer = _get(root, path)
        wrapper = make_lora(layer, rank, alpha, g)
        _set(root, path, wrapper)
        out[names[path]] = wrapper
    return out


def state_dict(modules: dict[str, _LoRABase], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    sd = {}
    for key, m in modules.items():
        sd[f"{key}.lora_down.weight"] = m.lora_down.detach().to("cpu", dtype).contiguous()
        sd[f"{key}.lora_up.weight"] = m.lora_up.detach().to("cpu", dtype).contiguous()
        sd[f"{key}.alpha"] = torch.tensor(m.alpha, dtype=dtype)
    return sd


def load_into(modules: dict[str, _LoRABase], sd: dict[str, torch.Tensor], input_name: str) -> None:
    """Copy LoRA weights from a kohya state dict into the wrappers; InputError naming what does not fit."""
    from .weights_io import check_keys

    expected = [f"{k}.{s}" for k in modules for s in ("lora_down.weight", "lora_up.weight")]
    check_keys(sd.keys(), expected, "LoRA for this model and settings", input_name)
    with torch.inference_mode(False), torch.no_grad():
        for key, m in modules.items():
            for attr in ("lora_down", "lora_up"):
                src = sd[f"{key}.{attr}.weight"]
                dst = getattr(m, attr)
                if tuple(src.shape) != tuple(dst.shape):
                    raise InputError(input_name, f"{key}.{attr}.weight of shape {tuple(dst.shape)}",
                                     f"shape {tuple(src.shape)}")
                dst.copy_(src.to(dst.dtype))
