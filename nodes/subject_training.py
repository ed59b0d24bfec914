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

Everything runs on trainable copies made outside inference mode; the input model, CLIP and weights are untouched.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .text_fusion import fuse_tokens, make_prompt, placeholder_id, text_key
from .trainable import out_of_place_clip
from .adapters import SubjectWeights, check_model, gated
from .errors import InputError, require
from .introspect import BlockKey, base_model, family
from .location import CONV_IN, box_to_xyxy, expanded_conv, location_channel, mask_to_box, output_channels

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


def training_target(ms, sigma: torch.Tensor, x_noisy: torch.Tensor, z0: torch.Tensor, noise: torch.Tensor):
    """The model output that ``ms.calculate_denoised`` turns into z0: eps for eps-prediction models, v for
    v-prediction ones (SD2-768)."""
    import comfy.model_sampling as msm

    if isinstance(ms, msm.V_PREDICTION) and not isinstance(ms, msm.EDM):
        sd2 = ms.sigma_data ** 2
        s = sigma.view(-1, *([1] * (x_noisy.ndim - 1)))
        return (x_noisy * sd2 / (s ** 2 + sd2) - z0) * (s ** 2 + sd2) ** 0.5 / (s * ms.sigma_data)
    return noise


def _trainable_copy(module: torch.nn.Module, device, dtype=torch.float32) -> torch.nn.Module:
    """A deep copy with normal (non-inference) float32 tensors on ``device``, all frozen."""
    with torch.inference_mode(False):
        new = copy.deepcopy(module)
        for mod in new.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    t = p.detach().clone().to(device)
                    mod._parameters[name] = torch.nn.Parameter(t.to(dtype) if t.is_floating_point() else t,
                                                               requires_grad=False)
            for name, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[name] = b.detach().clone().to(device)
    return new


# ----------------------------------------------------------------------------------------------------- trainer
class SubjectTrainer:
    def __init__(self, model, clip, vae, clip_vision, weights: SubjectWeights, examples: list[Example],
                 lr: float = LR, attn_weight: float = ATTN_WEIGHT, warmup: int = WARMUP, seed: int = 0,
                 use_bbox: bool = False, device=None):
        import comfy.model_management as mm
        import comfy.model_sampling as msm

        fam = family(model, "model")
        require(fam in ("sd15", "sd2"), "model", "an SD1.5 or SD2.x model (single text encoder)", fam)
        check_model(weights, model)
        require(len(examples) > 0, "images", "at least one training image", "none")
        self.key = text_key(clip)
        self.ph = placeholder_id(clip, self.key)
        self.attn_weight, self.use_bbox, self.lr, self.warmup = float(attn_weight), bool(use_bbox), float(lr), int(warmup)
        self.device = device or mm.get_torch_device()
        self.weights = weights
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.steps = weights.steps
        bm = base_model(model)
        self.ms = bm.model_sampling
        if isinstance(self.ms, msm.EDM) or not isinstance(self.ms, msm.EPS):
            raise InputError("model", "an eps- or v-prediction model", type(self.ms).__name__)
        self.v_pred = isinstance(self.ms, msm.V_PREDICTION)
        latent_ch = output_channels(model)

        mm.load_models_gpu([model])
        conv = model.get_model_object(CONV_IN)
        with torch.inference_mode(False):
            self.unet = _trainable_copy(bm.diffusion_model, self.device)
            if "input_blocks.0.0.weight" in weights.unet:
                new_conv = expanded_conv(self.unet.input_blocks[0][0], 0 if int(conv.weight.shape[1]) > latent_ch else 1,
                                         weights.unet["input_blocks.0.0.weight"], weights.unet.get("input_blocks.0.0.bias"))
            elif int(conv.weight.shape[1]) == latent_ch + 1:
                new_conv = expanded_conv(conv, 0, conv.weight, conv.bias)
            else:
                require(int(conv.weight.shape[1]) == latent_ch, "model", f"{latent_ch} or {latent_ch + 1} input channels",
                        int(conv.weight.shape[1]))
                new_conv = expanded_conv(conv, 1)
            new_conv = _trainable_copy(new_conv, self.device)
            self.unet.input_blocks[0][0] = new_conv
            sd = self.unet.state_dict()
            for k, v in weights.unet.items():
                if ".attn2.to_" in k:
                    require(k in sd and sd[k].shape == v.shape, "weights", "attn2 weights matching the model", k)
                    dict(self.unet.named_parameters())[k].data.copy_(v.to(self.device, torch.float32))
            self.text = out_of_place_clip(_trainable_copy(clip.cond_stage_model, self.device))
            self.mods = _trainable_copy(weights.modules, self.device)
            self.train_names = ["input_blocks.0.0.weight", "input_blocks.0.0.bias"] + [
                n for n, _ in self.unet.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n]
            named = dict(self.unet.named_parameters())
            params = [named[n] for n in self.train_names if n in named] + list(self.mods.parameters())
            for p in params:
                p.requires_grad_(True)
            self.params = params
            self.opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0, foreach=True)
        self.unet.train(False)
        self.text.train(False)
        self.index = {BlockKey(b[0], b[1], b[2]): i for i, b in enumerate(weights.config["blocks"])}
        self.clip = clip
        self.examples = [self._prepare(ex, vae, clip_vision, bm) for ex in examples]
        self.attn_keys = attention_blocks(self.unet, self.examples[0]["z0"].shape[-2:])

    # ------------------------------------------------------------------------------------------ preprocessing
    def _prepare(self, ex: Example, vae, clip_vision, bm) -> dict:
        with torch.inference_mode(False):
            ex = Example(ex.image.detach().clone().cpu().float(), ex.masks.detach().clone().cpu().float(),
                         ex.caption, list(ex.labels))
            return self._prepare_normal(ex, vae, clip_vision, bm)

    def _prepare_normal(self, ex: Example, vae, clip_vision, bm) -> dict:
        from .images import subject_on_white

        h, w = int(ex.image.shape[0]), int(ex.image.shape[1])
        require(h % 8 == 0 and w % 8 == 0, "images", "images whose sides are multiples of 8", f"{w}x{h}")
        masks = (ex.masks.float() > 0.5).float()
        require(masks.ndim == 3 and masks.shape[0] in (1, 2), "masks", "1 or 2 subject masks per image",
                tuple(masks.shape))
        require(tuple(masks.shape[-2:]) == (h, w), "masks", f"masks of the image size {w}x{h}",
                f"{masks.shape[-1]}x{masks.shape[-2]}")
        for i in range(masks.shape[0]):
            if float(masks[i].sum()) == 0:
                raise InputError("masks", "masks that mark each subject", f"an empty mask (subject {i})")
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
    def _context(self, ex: dict, drop_text: bool) -> torch.Tensor:
        if drop_text:
            cond = self.text.encode_token_weights(ex["empty"])[0]
        else:
            emb = self.mods.text_mlp(ex["cls"].to(self.device))
            toks, _ = fuse_tokens(ex["text"], self.key, self.ph, [emb[i] for i in range(emb.shape[0])])
            cond = self.text.encode_token_weights(toks)[0]
        return cond.to(self.device, torch.float32)

    def losses(self, i: int, t: int, noise: torch.Tensor, drop_text: bool = False, drop_mask: bool = False,
               records: list | None = None):
        """(mse, attention-control loss) for example ``i`` at timestep ``t`` with ``noise``."""
        ex = self.examples[i]
        dev = self.device
        z0 = ex["z0"].to(dev)
        sigma = self.ms.sigma(torch.tensor([float(t)])).to(dev)
        x_noisy = z0 + noise.to(dev) * sigma.view(-1, 1, 1, 1)
        x_in = self.ms.calculate_input(sigma, x_noisy)
        loc = torch.zeros_like(ex["loc"]) if drop_mask else ex["loc"]
        objs = self.mods.grounding(ex["tokens"][None].to(dev), torch.ones(1, ex["tokens"].shape[0], dtype=torch.bool,
                                   device=dev), ex["boxes"][None].to(dev), self.use_bbox)
        ctx = self._context(ex, drop_text)
        recs = [] if records is None else records
        to = {"patches": {"middle_patch": [AdapterRunner(self.mods.adapters, self.index, objs)]},
              "patches_replace": {"attn2": {tuple(k): AttentionRecorder(recs) for k in self.attn_keys}},
              "cond_or_uncond": [0], "sigmas": sigma}
        out = self.unet(torch.cat([x_in, loc.to(dev)], dim=1), timesteps=self.ms.timestep(sigma).float(),
                        context=ctx, transformer_options=to)
        target = training_target(self.ms, sigma, x_noisy, z0, noise.to(dev))
        mse = F.mse_loss(out.float(), target.float())
        if drop_text:
            attn = mse.new_zeros(())
        else:
            k = ex["idx"].shape[1]
            attn = attention_control_loss(recs, ex["idx"].to(dev), torch.ones(1, k, dtype=torch.bool, device=dev),
                                          ex["segs"].to(dev))
        return mse, attn

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

    def step(self) -> dict:
        with torch.inference_mode(False), torch.enable_grad():
            i = self.rng.randrange(len(self.examples))
            ex = self.examples[i]
            t = int(torch.randint(0, 1000, (1,), generator=self.gen))
            noise = torch.randn(ex["z0"].shape, generator=self.gen)
            r = self.rng.random()
            drop_text = r < TEXT_DROP
            drop_mask = MASK_DROP[0] <= r < MASK_DROP[1]
            mse, attn = self.losses(i, t, noise, drop_text, drop_mask)
            loss = mse + self.attn_weight * attn
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.steps += 1
            scale = min(1.0, self.steps / self.warmup) if self.warmup > 0 else 1.0
            for g in self.opt.param_groups:
                g["lr"] = self.lr * scale
            self.opt.step()
        return {"loss": float(loss.detach()), "mse": float(mse.detach()), "attn": float(attn.detach())}

    def train(self, steps: int, callback=None) -> list[dict]:
        log = []
        for s in range(steps):
            log.append(self.step())
            if callback is not None:
                callback(s, log[-1])
        return log

    # ---------------------------------------------------------------------------------------------- export
    def result(self) -> SubjectWeights:
        named = dict(self.unet.named_parameters())
        unet = {n: named[n].detach().float().cpu().clone() for n in self.train_names if n in named}
        mods = copy.deepcopy(self.mods).cpu()
        for p in mods.parameters():
            p.requires_grad_(False)
        mods.eval()
        return SubjectWeights(self.weights.config, mods, unet, True, self.steps)
