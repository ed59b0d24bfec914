"""Training Subject-Diffusion's new parts (arXiv 2307.11410 Eq. 3; official ``train.py``):

    loss = || target - f(z_t, t, text(y, MLP(cls)), adapters(h_e), location) ||^2 + 0.01 * L_attn

Trainable: the UNet's ``conv_in`` (5 channels), every ``attn2.to_k`` / ``attn2.to_v``, the gated adapters, the
grounding MLP (patch tokens + Fourier boxes) and the CLS MLP. Frozen: the rest of the UNet, the text encoder
(gradients flow through it to the CLS MLP) and CLIP vision. CFG dropout as the official code: one r ~ U(0,1) per
sample, text -> "" when r < 0.10, location channel -> 0 when 0.05 <= r < 0.15.

L_attn is FastComposer's balanced L1 (official ``third_party/localization_loss.py``): for each object token (the
placeholder "sks" and the entity word two tokens before it, per subject) and each head, the mean cross-attention
probability over background pixels minus the mean over the subject's pixels (subject mask resized bilinearly to
the layer's grid); averaged over heads, objects, batch, and the attention layers below full latent resolution
(on SD1.5 at 512 px: 32, 16, 8, 16, 32 - the middle 5 of 7 levels). Text-dropped samples are excluded.

The trainer runs on the pack's training engine (``nodes/training_engine.py``: resume, DDP, progress, cancellation,
mixed precision, NaN stop) with the forward process of the model's own ``model_sampling``. The UNet and text encoder
are ``frozen_copy``s (``nodes/frozen_weights.py``): their frozen weights alias the model's storage, only conv_in and
attn2 k/v are cloned as trainables; the input model, CLIP and weights are untouched.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .text_fusion import fuse_tokens, make_prompt, placeholder_id, text_key
from .adapters import SubjectWeights, check_model, gated
from .errors import InputError, require
from .forward_process import sample_timesteps
from .introspect import BlockKey, base_model, family
from .location import CONV_IN, box_to_xyxy, expanded_conv, location_channel, mask_to_box, output_channels
from .trainable import out_of_place_clip

TEXT_DROP = 0.10
MASK_DROP = (0.05, 0.15)
ATTN_WEIGHT = 0.01
LR = 3e-5
WARMUP = 1000


@dataclass
class Example:
    image: torch.Tensor        # [H, W, 3] 0..1
    masks: torch.Tensor        # [S, H, W] subject masks (1 = subject), S = 1 or 2
    caption: str
    labels: list


# ----------------------------------------------------------------------------------------- attention control
def attention_control_loss(records, token_idx: torch.Tensor, valid: torch.Tensor, segs: torch.Tensor):
    """records: list of (probs [B, heads, h*w, T], (h, w)); token_idx [B, K] long; valid [B, K] bool; segs [B, K, H, W]
    subject masks of each object token. Balanced L1 averaged over layers (see module doc)."""
    if not records:
        return segs.new_zeros(())
    total = 0.0
    for probs, (h, w) in records:
        b, heads, n, t = probs.shape
        seg = F.interpolate(segs.float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        seg = seg.reshape(b, -1, n).transpose(1, 2).unsqueeze(1).to(probs.dtype)           # [B, 1, N, K]
        a = torch.gather(probs, 3, token_idx.view(b, 1, 1, -1).expand(b, heads, n, token_idx.shape[1]))
        bg = 1.0 - seg
        obj_mean = (a * seg).sum(2) / (seg.sum(2) + 1e-5)                                    # [B, heads, K]
        bg_mean = (a * bg).sum(2) / (bg.sum(2) + 1e-5)
        per = (bg_mean - obj_mean).mean(1) * valid.to(probs.dtype)                           # [B, K]
        total = total + (per.sum(1) / (valid.to(probs.dtype).sum(1) + 1e-5)).mean()
    return total / len(records)


class AttentionRecorder:
    """attn2 replace that computes softmax(q k^T / sqrt(d)) explicitly and records it for the loss."""

    def __init__(self, records: list):
        self.records = records

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        b, nq, inner = q.shape
        d = inner // heads
        qh = q.view(b, nq, heads, d).transpose(1, 2)
        kh = k.view(b, k.shape[1], heads, d).transpose(1, 2)
        vh = v.view(b, v.shape[1], heads, d).transpose(1, 2)
        probs = torch.softmax((qh @ kh.transpose(-1, -2)) * (d ** -0.5), dim=-1)
        shape = extra_options["activations_shape"]
        self.records.append((probs, (int(shape[-2]), int(shape[-1]))))
        return (probs @ vh).transpose(1, 2).reshape(b, nq, inner)


class AdapterRunner:
    """middle_patch for training: the trainable adapters on every block, reference tokens for all rows."""

    def __init__(self, adapters, index, objs):
        self.adapters, self.index, self.objs = adapters, index, objs

    def __call__(self, x, extra_options):
        i = self.index.get(BlockKey.from_options(extra_options))
        if i is None:
            return x
        return gated(self.adapters[i], x, self.objs.expand(x.shape[0], -1, -1).to(x.dtype))


def attention_blocks(unet, latent_hw) -> list[BlockKey]:
    """Transformer blocks whose token grid is below full latent resolution (SD1.5: input 4,5,7,8, middle, output
    3..8)."""
    from comfy.ldm.modules.attention import SpatialTransformer

    keys = []
    res = {}

    def probe(name, bid, seq, factor):
        for layer in seq:
            if isinstance(layer, SpatialTransformer):
                for j in range(len(layer.transformer_blocks)):
                    res[BlockKey(name, bid, j)] = factor

    # the grid factor of each block from the UNet's down/up structure
    factor = 1
    for i, blk in enumerate(unet.input_blocks):
        if any(type(l).__name__ == "Downsample" for l in blk):
            factor *= 2
        probe("input", i, blk, factor)
    probe("middle", 0, unet.middle_block, factor)
    for i, blk in enumerate(unet.output_blocks):
        probe("output", i, blk, factor)
        if any(type(l).__name__ == "Upsample" for l in blk):
            factor //= 2
    for k, f in res.items():
        if f > 1:
            keys.append(k)
    return keys


class SubjectStep(torch.nn.Module):
    """The engine's module: the UNet (frozen weights aliased; conv_in and attn2 k/v trainable), the frozen text
    encoder (aliased; gradients flow through it to the CLS MLP) and the trainable adapters + MLPs. ``forward(batch)``
    is the mean loss over the batch's items, each ``(example, t, noise, drop_text, drop_mask)``."""

    def __init__(self, base_model, unet, text, mods, index, attn_keys, examples, key, ph, use_bbox, attn_weight,
                 device):
        super().__init__()
        from .training_engine import UNetCall

        self.unet, self.text, self.mods = unet, text, mods
        self._call = [UNetCall(base_model, unet)]   # not a submodule: the shell shares the base model's modules
        self.model_sampling = base_model.model_sampling
        self.index, self.attn_keys, self.examples = index, attn_keys, examples
        self.key, self.ph, self.use_bbox, self.attn_weight = key, ph, bool(use_bbox), float(attn_weight)
        self.device = torch.device(device)

    def _context(self, ex: dict, drop_text: bool) -> torch.Tensor:
        if drop_text:
            cond = self.text.encode_token_weights(ex["empty"])[0]
        else:
            emb = self.mods.text_mlp(ex["cls"].to(self.device))
            toks, _ = fuse_tokens(ex["text"], self.key, self.ph, [emb[i] for i in range(emb.shape[0])])
            cond = self.text.encode_token_weights(toks)[0]
        return cond.to(self.device, torch.float32)

    def losses(self, i: int, sigma: torch.Tensor, noise: torch.Tensor, drop_text: bool = False,
               drop_mask: bool = False, records: list | None = None):
        """(mse, attention-control loss) for example ``i`` at noise level ``sigma`` [1] with ``noise``."""
        from . import forward_process as fp

        ex = self.examples[i]
        dev = self.device
        z0 = ex["z0"].to(dev)
        sigma = sigma.to(dev, torch.float32).reshape(1)
        noise = noise.to(dev)
        loc = torch.zeros_like(ex["loc"]) if drop_mask else ex["loc"]
        objs = self.mods.grounding(ex["tokens"][None].to(dev), torch.ones(1, ex["tokens"].shape[0], dtype=torch.bool,
                                   device=dev), ex["boxes"][None].to(dev), self.use_bbox)
        ctx = self._context(ex, drop_text)
        recs = [] if records is None else records
        to = {"patches": {"middle_patch": [AdapterRunner(self.mods.adapters, self.index, objs)]},
              "patches_replace": {"attn2": {tuple(k): AttentionRecorder(recs) for k in self.attn_keys}},
              "cond_or_uncond": [0], "sigmas": sigma}
        out = self._call[0](fp.noisy(self.model_sampling, sigma, z0, noise), sigma,
                            [(ctx, {"noise_concat": loc.to(dev)})], [1], transformer_options=to)
        mse = F.mse_loss(out.float(), fp.target(self.model_sampling, sigma, z0, noise).float())
        if drop_text:
            attn = mse.new_zeros(())
        else:
            k = ex["idx"].shape[1]
            attn = attention_control_loss(recs, ex["idx"].to(dev), torch.ones(1, k, dtype=torch.bool, device=dev),
                                          ex["segs"].to(dev))
        return mse, attn

    def forward(self, batch: dict) -> dict:
        tot_m = tot_a = 0.0
        items = batch["items"]
        for i, sigma, noise, drop_text, drop_mask in items:
            m, a = self.losses(i, sigma, noise, drop_text, drop_mask)
            tot_m = tot_m + m
            tot_a = tot_a + a
        mse, attn = tot_m / len(items), tot_a / len(items)
        return {"loss": mse + self.attn_weight * attn, "mse": mse, "attn": attn}


def _mix(*xs: int) -> int:
    import hashlib

    h = hashlib.blake2b(repr(xs).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


# ----------------------------------------------------------------------------------------------------- trainer
class SubjectTrainer:
    """Subject-Diffusion's trainer on the training engine (``nodes/training_engine.py``): resume, DDP, progress,
    cancellation, mixed precision, NaN stop. Randomness of step s (which examples, timesteps, noise, dropout) is a
    pure function of (seed, s) over the global batch of ``batch_size`` x processes examples."""

    find_unused_parameters = True   # a text-dropped example leaves the CLS MLP out of the graph

    def __init__(self, model, clip, vae, clip_vision, weights: SubjectWeights, examples: list[Example],
                 lr: float = LR, attn_weight: float = ATTN_WEIGHT, warmup: int = WARMUP, seed: int = 0,
                 use_bbox: bool = False, device=None, batch_size: int = 1, training_dtype: str = "auto",
                 max_grad_norm: float = 0.0, grad_accumulation: int = 1):
        import comfy.model_management as mm
        import comfy.model_sampling as msm

        from .frozen_weights import frozen_copy
        from .training_engine import TRAINING_DTYPES, ParamGroup, autocast_dtype

        fam = family(model, "model")
        require(fam in ("sd15", "sd2"), "model", "an SD1.5 or SD2.x model (single text encoder)", fam)
        check_model(weights, model)
        require(len(examples) > 0, "images", "at least one training image", "none")
        require(isinstance(batch_size, int) and batch_size >= 1, "batch_size", "at least 1", batch_size)
        require(training_dtype in TRAINING_DTYPES, "training_dtype", f"one of {TRAINING_DTYPES}", training_dtype)
        for name, v in (("learning_rate", lr), ("attention_loss_weight", attn_weight)):
            require(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, name, "a finite number >= 0", v)
        self.key = text_key(clip)
        self.ph = placeholder_id(clip, self.key)
        self.family = fam
        self.attn_weight, self.use_bbox = float(attn_weight), bool(use_bbox)
        self.lr, self.warmup = float(lr), int(warmup)
        self.seed, self.batch_size, self.training_dtype = int(seed), int(batch_size), training_dtype
        self.max_grad_norm = float(max_grad_norm)
        require(isinstance(grad_accumulation, int) and grad_accumulation >= 1, "grad_accumulation", "at least 1",
                grad_accumulation)
        self.grad_accumulation = int(grad_accumulation)
        self.device = device or mm.get_torch_device()
        self.weights = weights
        self.steps = weights.steps
        bm = base_model(model)
        self.ms = bm.model_sampling
        if isinstance(self.ms, msm.EDM) or not isinstance(self.ms, msm.EPS):
            raise InputError("model", "an eps- or v-prediction model", type(self.ms).__name__)
        latent_ch = output_channels(model)
        ac = autocast_dtype(training_dtype, self.device)
        frozen_dtype = torch.float32 if ac is None else None

        mm.load_models_gpu([model])
        conv = model.get_model_object(CONV_IN)
        with torch.inference_mode(False):
            kv = [n for n, _ in bm.diffusion_model.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n]
            # frozen weights aliased (no second UNet); attn2 k/v cloned as trainables in place
            self.unet, trainables = frozen_copy(bm.diffusion_model, kv, frozen_dtype=frozen_dtype, device=self.device)
            have = int(conv.weight.shape[1])
            if "input_blocks.0.0.weight" in weights.unet:
                new_conv = expanded_conv(self.unet.input_blocks[0][0], 0 if have > latent_ch else 1,
                                         weights.unet["input_blocks.0.0.weight"],
                                         weights.unet.get("input_blocks.0.0.bias"))
            elif have == latent_ch + 1:
                new_conv = expanded_conv(conv, 0, conv.weight, conv.bias)
            else:
                require(have == latent_ch, "model", f"{latent_ch} or {latent_ch + 1} input channels", have)
                new_conv = expanded_conv(conv, 1)
            new_conv, conv_params = frozen_copy(new_conv, ("weight", "bias"), device=self.device)
            self.unet.input_blocks[0][0] = new_conv
            for k, v in weights.unet.items():
                if ".attn2.to_" in k:
                    require(k in trainables and trainables[k].shape == v.shape, "weights",
                            "attn2 weights matching the model", k)
                    with torch.no_grad():
                        trainables[k].copy_(v.to(self.device, torch.float32))
            self.text = out_of_place_clip(frozen_copy(clip.cond_stage_model, (), frozen_dtype=frozen_dtype,
                                                      device=self.device)[0])
            self.mods = copy.deepcopy(weights.modules).to(self.device, torch.float32)
            self.mods.requires_grad_(True)
            self.train_names = ["input_blocks.0.0.weight", "input_blocks.0.0.bias"] + kv
            self._named = {"input_blocks.0.0.weight": conv_params["weight"],
                           "input_blocks.0.0.bias": conv_params["bias"], **trainables}
            self.groups = [ParamGroup("unet", [self._named[n] for n in self.train_names], self.lr, 0.0),
                           ParamGroup("modules", list(self.mods.parameters()), self.lr, 0.0)]
        self.unet.train(False)
        self.text.train(False)
        self.mods.train(False)
        self.index = {BlockKey(b[0], b[1], b[2]): i for i, b in enumerate(weights.config["blocks"])}
        self.clip = clip
        self.examples = [self._prepare(ex, vae, clip_vision, bm) for ex in examples]
        self.attn_keys = attention_blocks(self.unet, self.examples[0]["z0"].shape[-2:])
        self.module = SubjectStep(bm, self.unet, self.text, self.mods, self.index, self.attn_keys, self.examples,
                                  self.key, self.ph, self.use_bbox, self.attn_weight, self.device)
        from .forward_process import training_sigmas

        self.sigmas = training_sigmas(self.ms)
        from .training_engine import fingerprint

        self.data_fingerprint = fingerprint([e["z0"] for e in self.examples], [e["tokens"] for e in self.examples],
                                            [str(ex.caption) + "|" + ",".join(ex.labels) for ex in examples],
                                            weights.state_dict())

    # ------------------------------------------------------------------------------------------ engine protocol
    def param_groups(self):
        return self.groups

    def batch(self, step: int, part: int, parts: int) -> dict:
        """Part ``part`` of the global batch of step ``step``: ``batch_size`` items drawn, in order, from a generator
        seeded by (seed, step) over all ``parts x batch_size`` rows."""
        g = torch.Generator().manual_seed(_mix(self.seed, 11, step))
        rows = []
        for _ in range(parts * self.batch_size):
            i = int(torch.randint(0, len(self.examples), (1,), generator=g))
            t = int(sample_timesteps(self.sigmas, 1, g))
            r = float(torch.rand((), generator=g))
            noise = torch.randn(self.examples[i]["z0"].shape, generator=g)
            rows.append((i, self.sigmas[t].reshape(1), noise, r < TEXT_DROP, MASK_DROP[0] <= r < MASK_DROP[1]))
        return {"items": rows[part * self.batch_size:(part + 1) * self.batch_size]}

    def engine_config(self, steps: int, checkpoint_every: int = 0):
        from .training_engine import EngineConfig

        return EngineConfig(steps=int(steps), warmup_steps=self.warmup, schedule="constant", weight_decay=0.0,
                            max_grad_norm=self.max_grad_norm, training_dtype=self.training_dtype,
                            checkpoint_every=int(checkpoint_every), grad_accumulation=self.grad_accumulation)

    def signature(self) -> dict:
        return {"technique": "subject-diffusion", "lr": self.lr, "warmup": self.warmup,
                "attn_weight": self.attn_weight, "seed": self.seed, "use_bbox": self.use_bbox,
                "batch_size": self.batch_size,
                "training_dtype": self.training_dtype, "max_grad_norm": self.max_grad_norm,
                "data": self.data_fingerprint}

    # ------------------------------------------------------------------------------------------ preprocessing
    def _prepare(self, ex: Example, vae, clip_vision, bm) -> dict:
        with torch.inference_mode(False):
            ex = Example(ex.image.detach().clone().cpu().float(), ex.masks.detach().clone().cpu().float(),
                         ex.caption, list(ex.labels))
            return self._prepare_normal(ex, vae, clip_vision, bm)

    def _prepare_normal(self, ex: Example, vae, clip_vision, bm) -> dict:
        from .images import check_masks, subject_on_white

        h, w = int(ex.image.shape[0]), int(ex.image.shape[1])
        require(h % 8 == 0 and w % 8 == 0, "images", "images whose sides are multiples of 8", f"{w}x{h}")
        require(ex.masks.ndim == 3 and ex.masks.shape[0] in (1, 2), "masks", "1 or 2 subject masks per image",
                tuple(ex.masks.shape))
        require(tuple(ex.masks.shape[-2:]) == (h, w), "masks", f"masks of the image size {w}x{h}",
                f"{ex.masks.shape[-1]}x{ex.masks.shape[-2]}")
        masks = (check_masks(ex.masks, None, "masks").float() > 0.5).float()
        require(len(ex.labels) == masks.shape[0], "labels", f"{masks.shape[0]} label(s), one per subject mask",
                f"{len(ex.labels)}")
        with torch.no_grad():
            z0 = bm.process_latent_in(vae.encode(ex.image[None, ..., :3]).float().cpu()).clone()
            refs = torch.stack([subject_on_white(ex.image, masks[i], 224) for i in range(masks.shape[0])])
            out = clip_vision.encode_image(refs)
            tokens = out["last_hidden_state"][:, 1:].float().cpu().clone()
            cls = out["image_embeds"].float().cpu().clone()
        boxes_px = [mask_to_box(masks[i]) for i in range(masks.shape[0])]
        loc = location_channel(boxes_px, [], z0.shape[-2], z0.shape[-1], factor=h // z0.shape[-2])
        boxes = torch.tensor([box_to_xyxy(b, w, h) for b in boxes_px], dtype=torch.float32)
        prompt = make_prompt(ex.caption, ex.labels)
        toks = self.clip.tokenize(prompt)
        _, pos = fuse_tokens(toks, self.key, self.ph, [None] * masks.shape[0])
        require(len(pos) == masks.shape[0] and min(pos) >= 3, "captions", "captions short enough that every "
                "'the {label} is sks' fits in the first 77 tokens", prompt)
        idx, segs = [], []
        for s, p in enumerate(pos):
            idx += [p, p - 2]                   # the placeholder and the entity word ("the {entity} is sks")
            segs += [masks[s], masks[s]]
        return {"z0": z0, "tokens": tokens, "cls": cls, "boxes": boxes, "loc": loc, "text": toks,
                "empty": self.clip.tokenize(""), "idx": torch.tensor([idx]), "segs": torch.stack(segs)[None]}

    # --------------------------------------------------------------------------------------------- one pass
    def losses(self, i: int, t: int, noise: torch.Tensor, drop_text: bool = False, drop_mask: bool = False,
               records: list | None = None):
        """(mse, attention-control loss) for example ``i`` at timestep ``t`` with ``noise``."""
        return self.module.losses(i, self.sigmas[int(t)].reshape(1), noise, drop_text, drop_mask, records)

    def evaluate(self, seed: int = 1234, timesteps=(250, 500, 750)) -> tuple[float, float]:
        """Mean (mse, attention loss) over every example at fixed timesteps and noise, no dropout."""
        g = torch.Generator().manual_seed(seed)
        tot_m = tot_a = 0.0
        with torch.inference_mode(False), torch.no_grad():
            for i, ex in enumerate(self.examples):
                for t in timesteps:
                    noise = torch.randn(ex["z0"].shape, generator=g)
                    m, a = self.losses(i, t, noise)
                    tot_m += float(m)
                    tot_a += float(a)
        n = len(timesteps) * len(self.examples)
        return tot_m / n, tot_a / n

    def train(self, steps: int, callback=None, *, checkpoint: str | None = None, checkpoint_every: int = 0,
              resume: bool = True, check_interrupt=None, progress: bool = True) -> list[dict]:
        """``steps`` optimizer steps on the engine; returns [{"loss", "mse", "attn"}] per step (resumed ones
        included). ``checkpoint``: the resume file (checkpoints every ``checkpoint_every`` steps and on cancel)."""
        from . import training_engine as engine

        def on_log(step, total, d):
            if callback is not None:
                callback(step - 1, d)

        with torch.inference_mode(False), torch.enable_grad():
            res = engine.run(self, self.engine_config(steps, checkpoint_every), self.device, checkpoint=checkpoint,
                             signature=self.signature(), family=self.family, technique="subject-diffusion",
                             resume=resume, on_log=on_log, check_interrupt=check_interrupt, progress=progress)
        self.steps = self.weights.steps + int(steps)
        self.last_run = res
        return [d for _, d in res.losses]

    # ---------------------------------------------------------------------------------------------- export
    def result(self) -> SubjectWeights:
        unet = {n: self._named[n].detach().float().cpu().clone() for n in self.train_names}
        mods = copy.deepcopy(self.mods).cpu()
        for p in mods.parameters():
            p.requires_grad_(False)
        mods.eval()
        return SubjectWeights(self.weights.config, mods, unet, True, self.steps)
