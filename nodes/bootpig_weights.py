"""BootPIG trained weights: the pack's file format, the official code's diffusers layout, and applying them.

Pack format (``models/bootpig/*.safetensors``), version 1:
- ``ref_unet.<ComfyUI/LDM UNet key>``: every weight of the trained reference UNet;
- ``base_attn1.<ComfyUI/LDM UNet key>``: the trained self-attention (attn1 q/k/v/out) weights of the base UNet;
- metadata ``personalize.format = "bootpig"``, ``personalize.format_version = "1"``, ``personalize.family`` (sd15, sd2,
  sdxl), which the loader checks against the model it is applied to.
Official layout (SalesforceAIResearch/bootpig ``checkpoint-N/``): a folder with ``ref_unet/`` and ``base_unet/``,
each a diffusers UNet (``diffusion_pytorch_model.safetensors``); keys are converted with ComfyUI's own
``comfy.utils.unet_to_diffusers`` map.
"""
from __future__ import annotations

import os

import torch

from . import weights_io
from .errors import InputError
from .introspect import FAMILY_NAMES, base_model, family as model_family

FORMAT = "bootpig"
VERSION = "1"
REF, ATTN1 = "ref_unet.", "base_attn1."
CONTEXT_DIM_FAMILY = {768: "sd15", 1024: "sd2", 2048: "sdxl"}


def attn1_keys(unet_state_keys) -> list[str]:
    return [k for k in unet_state_keys if ".attn1." in k]


SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def save(path: str, ref_unet: dict, base_attn1: dict, family: str, metadata: dict | None = None,
         dtype: str = "fp32") -> str:
    """Write the pack's BootPIG file (atomically, refusing non-finite weights); floating tensors stored as
    ``dtype``."""
    if family not in FAMILY_NAMES:
        raise ValueError(f"family must be one of {sorted(FAMILY_NAMES)}, got {family!r}")
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(SAVE_DTYPES)}, got {dtype!r}")
    want = SAVE_DTYPES[dtype]

    def cast(v):
        return v.to(want) if v.is_floating_point() else v

    tensors = {REF + k: cast(v) for k, v in ref_unet.items()}
    tensors.update({ATTN1 + k: cast(v) for k, v in base_attn1.items()})
    meta = dict(metadata or {})
    meta.update({"personalize.format": FORMAT, "personalize.format_version": VERSION, "personalize.family": family})
    return weights_io.save_atomic(tensors, path, meta)


def _diffusers_file(folder: str) -> str:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    raise InputError("bootpig_name", f"a diffusers UNet saved as safetensors in {folder}",
                     "no diffusion_pytorch_model.safetensors (pickled .bin files are not loaded)")


def _from_diffusers(sd: dict, unet_config: dict, what: str) -> dict:
    import comfy.utils

    mapping = comfy.utils.unet_to_diffusers(unet_config)  # diffusers key -> ldm key
    out, unknown = {}, []
    for k, v in sd.items():
        if k in mapping:
            out[mapping[k]] = v
        else:
            unknown.append(k)
    if unknown:
        raise InputError("bootpig_name", f"a diffusers UNet matching the model for {what}",
                         f"{len(unknown)} keys it does not have, e.g. {unknown[:3]}")
    return out


def load(path: str, model) -> tuple[dict, dict, str]:
    """(reference UNet state dict, base attn1 state dict, family), both keyed like the model's diffusion_model,
    checked against ``model``: same family, no missing keys."""
    fam = model_family(model)
    unet = base_model(model).diffusion_model
    expected = list(unet.state_dict().keys())
    if os.path.isdir(path):
        ref_dir, base_dir = os.path.join(path, "ref_unet"), os.path.join(path, "base_unet")
        if not (os.path.isdir(ref_dir) and os.path.isdir(base_dir)):
            raise InputError("bootpig_name", "a .safetensors file in the pack format, or a folder with ref_unet/ and "
                             "base_unet/ (the official code's checkpoint layout)", os.path.basename(path))
        ref_raw, _ = weights_io.load(_diffusers_file(ref_dir), input_name="bootpig_name")
        probe = [v for k, v in ref_raw.items() if k.endswith("attn2.to_k.weight")]
        file_family = CONTEXT_DIM_FAMILY.get(int(probe[0].shape[1])) if probe else None
        _check_family(file_family, fam, path)
        cfg = base_model(model).model_config.unet_config
        ref = _from_diffusers(ref_raw, cfg, "ref_unet")
        base_raw, _ = weights_io.load(_diffusers_file(base_dir), input_name="bootpig_name")
        base_sd = _from_diffusers({k: v for k, v in base_raw.items() if ".attn1." in k}, cfg, "base_unet")
    else:
        tensors, meta = weights_io.load(path, input_name="bootpig_name")
        if meta.get("personalize.format") != FORMAT:
            raise InputError("bootpig_name", "a BootPIG weights file made by this pack (metadata personalize.format="
                             "bootpig)", f"{os.path.basename(path)} with format {meta.get('personalize.format')!r}")
        _check_family(meta.get("personalize.family"), fam, path)
        ref = {k[len(REF):]: v for k, v in tensors.items() if k.startswith(REF)}
        base_sd = {k[len(ATTN1):]: v for k, v in tensors.items() if k.startswith(ATTN1)}
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    for part, sd in (("ref_unet", ref), ("base_attn1", base_sd)):
        for k, v in sd.items():
            want = shapes.get(k)
            if want is not None and tuple(v.shape) != want:
                raise InputError("bootpig_name", f"BootPIG weights made for this model's size ({part} {k}: {want})",
                                 f"{os.path.basename(path)} with {tuple(v.shape)}: weights of another model size")
    weights_io.check_keys(ref.keys(), expected, "reference UNet (ref_unet.*)", "bootpig_name")
    weights_io.check_keys(base_sd.keys(), attn1_keys(expected), "set of base attn1 weights (base_attn1.*)",
                          "bootpig_name")
    return ref, base_sd, fam


def _check_family(file_family, model_fam, path):
    if file_family != model_fam:
        raise InputError("bootpig_name", f"BootPIG weights made for {FAMILY_NAMES.get(model_fam, model_fam)} "
                         "(the model's family)",
                         f"{os.path.basename(path)} made for {FAMILY_NAMES.get(file_family, file_family or 'unknown')}")


def apply(model, ref_sd: dict, attn1_sd: dict):
    """(base MODEL clone with the trained attn1 weights as 'set' patches, reference-UNet MODEL with its own weights)."""
    import comfy.model_management as mm
    import comfy.model_patcher

    base = model.clone()
    base.add_patches({f"diffusion_model.{k}": ("set", (v,)) for k, v in attn1_sd.items()}, 1.0, 1.0)
    bm = base_model(model)
    with torch.inference_mode(False):
        ref_bm = type(bm)(bm.model_config, model_type=bm.model_type, device=torch.device("cpu"))
        dtype = bm.get_dtype()
        ref_bm.diffusion_model.load_state_dict({k: v.to(dtype) for k, v in ref_sd.items()}, strict=True)
    ref = comfy.model_patcher.ModelPatcher(ref_bm, load_device=model.load_device, offload_device=mm.unet_offload_device())
    return base, ref
