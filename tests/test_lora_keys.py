"""LoRA file keys (issue 17): kohya's naming per family, and ComfyUI's own loader maps every key.

kohya's sd-scripts name a LoRA module ``"lora_unet_" + <module path in kohya's UNet>`` with dots turned into
underscores (networks/lora.py). kohya's SD1.5/SD2 UNet is diffusers' UNet2DConditionModel (``down_blocks.0...``);
its SDXL UNet (library/sdxl_original_unet.py) keeps the original LDM state-dict paths (``input_blocks.4.1...``).
"""
from __future__ import annotations

import logging

import pytest
import torch

from personalize.nodes import lora


class LoraLog(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        if "lora key not loaded" in record.getMessage():
            self.lines.append(record.getMessage())


def ldm_kohya_map(unet) -> dict[str, str]:
    """{kohya key: LDM module path} for every weight of the UNet's own (LDM) state dict, by kohya's rule."""
    out = {}
    for k in unet.state_dict():
        if k.endswith(".weight"):
            path = k[: -len(".weight")]
            out["lora_unet_" + path.replace(".", "_")] = path
    return out


def diffusers_kohya_map(unet_config) -> dict[str, str]:
    """{kohya key: LDM module path} for the diffusers UNet2DConditionModel naming (comfy.utils.unet_to_diffusers)."""
    import comfy.utils

    return {"lora_unet_" + d[: -len(".weight")].replace(".", "_"): ldm[: -len(".weight")]
            for d, ldm in comfy.utils.unet_to_diffusers(unet_config).items() if d.endswith(".weight")}


def fake_trained(names: dict, unet, seed=0) -> dict[str, torch.Tensor]:
    """A saved LoRA over ``names`` with non-zero up weights (a trained one), through the pack's own writer."""
    copy = lora.trainable_copy(unet)
    mods = lora.inject(copy, names, 2, 1.0, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in mods.values():
            m.lora_up.copy_(torch.randn(m.lora_up.shape, generator=g) * 0.1)
    return lora.state_dict(mods)


def load_stock(model, sd):
    """The stock LoraLoaderModelOnly path (comfy.sd.load_lora_for_models), 'lora key not loaded' lines captured."""
    import comfy.sd

    h = LoraLog()
    logging.getLogger().addHandler(h)
    try:
        with torch.inference_mode():
            m, _ = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0.0)
    finally:
        logging.getLogger().removeHandler(h)
    return m, h.lines


@pytest.mark.parametrize("targets", sorted(lora.UNET_TARGETS))
def test_sdxl_keys_are_kohya_ldm_paths(tiny_sdxl, targets):
    unet = tiny_sdxl.model.diffusion_model
    names = lora.unet_target_names(unet, tiny_sdxl.model.model_config.unet_config, targets)
    rule = ldm_kohya_map(unet)
    # 70 transformer blocks in 11 spatial transformers: (q, k, v, out) x 2 attentions [+ 2 ff per block, proj in/out]
    assert len(names) == (70 * 8 if targets == "attention" else 70 * 10 + 11 * 2)
    bad = [(p, k) for p, k in names.items() if rule.get(k) != p]
    assert not bad, f"SDXL keys that are not kohya's name of an LDM UNet module: {bad[:5]}"
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names.values()
    assert "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0" in names.values()
    assert "lora_unet_output_blocks_2_1_transformer_blocks_9_ff_net_2" in names.values() or targets == "attention"
    assert not [k for k in names.values() if "down_blocks" in k or "up_blocks" in k or "mid_block" in k]


@pytest.mark.parametrize("targets", sorted(lora.UNET_TARGETS))
def test_sd15_keys_stay_kohya_diffusers_paths(tiny_sd15, targets):
    cfg = tiny_sd15.model.model_config.unet_config
    names = lora.unet_target_names(tiny_sd15.model.diffusion_model, cfg, targets)
    rule = diffusers_kohya_map(cfg)
    assert len(names) == (16 * 8 if targets == "attention" else 16 * 12)
    bad = [(p, k) for p, k in names.items() if rule.get(k) != p]
    assert not bad, f"SD1.5 keys that are not kohya's (diffusers) name of the module: {bad[:5]}"
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names.values()
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0" in names.values()


def test_sd2_keys_are_diffusers_paths():
    """SD2 (context 1024, linear proj_in): the diffusers naming, like SD1.5."""
    cfg = {"context_dim": 1024, "use_linear_in_transformer": True}
    assert not lora.uses_ldm_names(cfg)
    assert lora.uses_ldm_names({"context_dim": 2048})


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_stock_loader_maps_every_key_onto_the_named_module(family, tiny_sd15, tiny_sdxl):
    """A saved file through comfy.sd.load_lora_for_models: 0 unmapped keys, one patch per LoRA module on exactly the
    module the key names, and the patched weight is W + up @ down * alpha / rank."""
    import comfy.lora

    model = tiny_sd15 if family == "sd15" else tiny_sdxl
    unet = model.model.diffusion_model
    names = lora.unet_target_names(unet, model.model.model_config.unet_config, "transformer")
    sd = fake_trained(names, unet)
    loaded, unmapped = load_stock(model, sd)
    assert unmapped == []
    assert set(loaded.patches) == {f"diffusion_model.{p}.weight" for p in names}
    path = next(p for p in names if p.endswith("attn1.to_q"))
    key = names[path]
    w = unet.get_submodule(path).weight.detach().float().clone()
    up, down = sd[f"{key}.lora_up.weight"].float(), sd[f"{key}.lora_down.weight"].float()
    want = w + (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * (float(sd[f"{key}.alpha"]) / down.shape[0])
    got = comfy.lora.calculate_weight(loaded.patches[f"diffusion_model.{path}.weight"], w.clone(),
                                      f"diffusion_model.{path}.weight")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
