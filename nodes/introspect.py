"""Model introspection: family, attention block keys in forward order, token grids."""
from __future__ import annotations

from typing import NamedTuple

from .errors import InputError

FAMILY_NAMES = {"sd15": "SD1.5", "sd2": "SD2.x", "sdxl": "SDXL"}
# the side (pixels) each family was trained at: the default size of references and training images
NATIVE_RESOLUTION = {"sd15": 512, "sd2": 512, "sdxl": 1024}


class BlockKey(NamedTuple):
    """Where a BasicTransformerBlock sits: ComfyUI's (block name, block id) plus its depth inside the transformer."""

    name: str
    id: int
    index: int

    @classmethod
    def from_options(cls, extra_options: dict) -> "BlockKey":
        name, bid = extra_options["block"][:2]
        return cls(name, int(bid), int(extra_options.get("block_index", 0)))


def base_model(model):
    """The BaseModel behind a ModelPatcher (or the BaseModel itself)."""
    return getattr(model, "model", model)


def family(model, input_name: str = "model") -> str:
    """'sd15', 'sd2' or 'sdxl' for UNet models of the Stable Diffusion family; InputError for anything else."""
    import comfy.model_base as mb

    bm = base_model(model)
    cfg = getattr(getattr(bm, "model_config", None), "unet_config", {}) or {}
    if isinstance(bm, mb.SDXL):
        return "sdxl"
    if type(bm) is mb.BaseModel:
        ctx = cfg.get("context_dim")
        if ctx == 768:
            return "sd15"
        if ctx == 1024:
            return "sd2"
    raise InputError(input_name, "an SD1.5, SD2.x or SDXL UNet model", type(bm).__name__)


def transformer_blocks(model) -> list[BlockKey]:
    """Every BasicTransformerBlock of the UNet, in forward order (16 on SD1.5, 70 on SDXL)."""
    from comfy.ldm.modules.attention import SpatialTransformer

    unet = base_model(model).diffusion_model
    keys: list[BlockKey] = []

    def scan(name: str, bid: int, seq) -> None:
        for layer in seq:
            if isinstance(layer, SpatialTransformer):
                keys.extend(BlockKey(name, bid, j) for j in range(len(layer.transformer_blocks)))

    for i, blk in enumerate(unet.input_blocks):
        scan("input", i, blk)
    scan("middle", 0, unet.middle_block)
    for i, blk in enumerate(unet.output_blocks):
        scan("output", i, blk)
    return keys


def attention_module(model, key: BlockKey, which: str = "attn1"):
    """The CrossAttention module (attn1 or attn2) of one transformer block."""
    from comfy.ldm.modules.attention import SpatialTransformer

    unet = base_model(model).diffusion_model
    seq = {"input": lambda: unet.input_blocks[key.id], "middle": lambda: unet.middle_block,
           "output": lambda: unet.output_blocks[key.id]}[key.name]()
    for layer in seq:
        if isinstance(layer, SpatialTransformer):
            return getattr(layer.transformer_blocks[key.index], which)
    raise KeyError(key)


def token_grid(extra_options: dict) -> tuple[int, int]:
    """(h, w) of the token grid an attention patch sees, from transformer_options['activations_shape']."""
    shape = extra_options["activations_shape"]
    return int(shape[-2]), int(shape[-1])


def latent_channels(model) -> int:
    """Input channels of the UNet this model runs (its own conv_in object patch included)."""
    get = getattr(model, "get_model_object", None)
    conv = get("diffusion_model.input_blocks.0.0") if get else base_model(model).diffusion_model.input_blocks[0][0]
    return int(conv.weight.shape[1])


class ModelShape(NamedTuple):
    """What a UNet's attention features look like: family, base width, channel multipliers, res blocks and
    transformer depths. References, templates and weights made on one shape only fit models of the same shape."""

    family: str
    model_channels: int
    channel_mult: tuple
    num_res_blocks: tuple
    transformer_depth: tuple
    transformer_depth_middle: int
    transformer_depth_output: tuple

    def describe(self) -> str:
        blocks = sum(self.transformer_depth) + self.transformer_depth_middle + sum(self.transformer_depth_output)
        return (f"an {FAMILY_NAMES.get(self.family, self.family)} UNet of width {self.model_channels} "
                f"(x{','.join(str(m) for m in self.channel_mult)}, {blocks} transformer blocks)")


def _ints(v) -> tuple:
    if v is None:
        return ()
    if isinstance(v, int):
        return (v,)
    return tuple(int(x) for x in v)


def shape(model, input_name: str = "model") -> ModelShape:
    """The ModelShape of a MODEL (ModelPatcher or BaseModel), read from its unet_config."""
    fam = family(model, input_name)
    cfg = getattr(base_model(model).model_config, "unet_config", {}) or {}
    return ModelShape(fam, int(cfg.get("model_channels", 0)), _ints(cfg.get("channel_mult")),
                      _ints(cfg.get("num_res_blocks")), _ints(cfg.get("transformer_depth")),
                      int(cfg.get("transformer_depth_middle") or 0), _ints(cfg.get("transformer_depth_output")))


def require_same_shape(model, other, input_name: str, what: str, model_name: str = "model") -> None:
    """InputError naming ``input_name`` when ``other`` (the model a reference/template/weights was made with) has
    another shape than ``model``."""
    want, got = shape(model, model_name), shape(other, input_name)
    if want != got:
        w, g = want.describe(), got.describe()
        if w == g:
            w, g = str(tuple(want)), str(tuple(got))
        raise InputError(input_name, f"{what} {w}, the shape of '{model_name}'", f"{what} {g}")
