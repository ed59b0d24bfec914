"""Training-free latent guidance during sampling (Pick-and-Draw, arXiv 2401.16762): one engine, several loss terms.

At every guided step the engine, before the step's denoising, runs the UNet on the current latent with the
**conditional rows only**, records cross-attention probabilities and layer features at the chosen transformer blocks
(an ``attn2_patch`` added to that one call only), stops the forward after the last block a loss reads, sums the
active losses and takes **one backward pass** to the latent, then moves the latent:

    z <- z - grad_z( sum_k eta_k(t) * w_k * L_k(z) ),   z = c_in(sigma) * x   (the UNet's input space)

and writes the result into the sampler's latent in place, so the step's denoising (and the sampler's state) use it.

Terms:
* :class:`AppearanceTerm` (appearance picking): UREMD between generated-subject features (pixels where the
  subject token's cross-attention map >= tau) and the palette: reference features (inside the reference mask, or the
  reference's own thresholded subject map) of the reference latent brought to the step's noise level by DDIM
  inversion (or re-noising).
* :class:`LayoutTerm` (layout drawing): sum over layers of the Frobenius norm of the difference of Gaussian-smoothed
  subject-token maps of this run and class-token maps of a template model/prompt on the same latent.

Gradients run under ``torch.inference_mode(False)`` + ``torch.enable_grad()`` on tensors cloned out of inference
mode. Weights loaded by ComfyUI nodes are inference tensors, which autograd refuses to save for backward: during
the guided forward :class:`ParamAlias` swaps the UNet's inference-tensor parameters for normal tensors that *share
their storage* (no copy; the original objects are put back right after), so backward works without duplicating the
UNet. If some other inference tensor still reaches autograd, the per-op :class:`InferenceAlias` mode takes over.

State: patch objects are immutable values (``GuidanceSpec`` in ``transformer_options``); per-run state (the DDIM
inversion, which steps were guided, a loss log) lives in a ``RunState`` a SAMPLER_SAMPLE wrapper makes per run.
"""
from __future__ import annotations

import logging
import math
import re
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .attention import PatchValue
from .errors import InputError, require
from .forward_process import seeded_noise
from .frozen_weights import InferenceAlias, ParamAlias
from .introspect import BlockKey, attention_module, base_model, token_grid, transformer_blocks

SPEC_KEY = "personalize.pick_and_draw.spec"
RUN_KEY = "personalize.pick_and_draw.run"
REC_KEY = "personalize.pick_and_draw.recording"
WRAPPER_KEY = "personalize.pick_and_draw"
SCHEDULES = ("linear_decay", "constant")
REFERENCE_NOISE = ("ddim_inversion", "renoise")

log = logging.getLogger("personalize.guidance")


# ---------------------------------------------------------------------------------------------------- tokens
def _special_ids(clip, key: str) -> set:
    tok = getattr(getattr(clip, "tokenizer", None), f"clip_{key}", None)
    ids = {49406, 49407}
    for attr in ("start_token", "end_token", "pad_token"):
        v = getattr(tok, attr, None)
        if isinstance(v, int):
            ids.add(v)
    if tok is not None and not getattr(tok, "pad_with_end", True):
        ids.add(getattr(tok, "pad_token", 0) or 0)
    return ids


def _flat_ids(clip, text: str) -> tuple[list, str]:
    tokens = clip.tokenize(text)
    key = "l" if "l" in tokens else sorted(tokens)[0]
    flat = []
    for chunk in tokens[key]:
        for t in chunk:
            tid = t[0]
            flat.append(int(tid) if isinstance(tid, int) else -1)  # embeddings (tensors) never match a word
    return flat, key


def word_positions(clip, prompt: str, word: str, input_name: str = "subject_word", prompt_name: str = "prompt"):
    """Positions of ``word``'s tokens in the text-encoder context of ``prompt`` (every occurrence), as ComfyUI lays
    the context out: chunks of 77 tokens (start, 75 tokens, end/pad) concatenated."""
    require(isinstance(word, str) and word.strip() != "", input_name, "a word of the prompt", repr(word))
    require(isinstance(prompt, str) and prompt.strip() != "", prompt_name, "the positive prompt text", repr(prompt))
    flat, key = _flat_ids(clip, prompt)
    wflat, _ = _flat_ids(clip, word.strip())
    special = _special_ids(clip, key)
    wids = [t for t in wflat if t not in special]
    require(len(wids) > 0, input_name, "a word that tokenizes to at least one token", repr(word))
    hits = []
    n = len(wids)
    for i in range(len(flat) - n + 1):
        if flat[i:i + n] == wids:
            hits.extend(range(i, i + n))
    if not hits:
        raise InputError(input_name, f"a word that occurs in {prompt_name}", repr(word),
                         f"{prompt_name} is {prompt!r}; write the word exactly as in the prompt (e.g. 'dog', not "
                         "'dogs')")
    return tuple(sorted(set(hits))), len(flat)


def replace_word(prompt: str, word: str, new: str) -> str:
    return re.sub(r"(?<![\w])" + re.escape(word.strip()) + r"(?![\w])", new.strip(), prompt, flags=re.IGNORECASE)


def encode_text(clip, text: str) -> torch.Tensor:
    """[1, T, C] text-encoder context of ``text`` (cpu float32)."""
    tokens = clip.tokenize(text)
    cond = clip.encode_from_tokens(tokens)
    if isinstance(cond, (tuple, list)):
        cond = cond[0]
    return cond.detach().float().cpu().clone()


def prompt_context(clip, prompt: str) -> torch.Tensor:
    """[1, L, C]: the encoding of ``prompt``'s start token, real tokens and first end token - what the sampler's
    positive conditioning must start with for the token positions to be right (checked when sampling starts)."""
    flat, key = _flat_ids(clip, prompt)
    special = _special_ids(clip, key)
    last = max([i for i, t in enumerate(flat) if t not in special], default=0)
    return encode_text(clip, prompt)[:, :last + 2].clone()


def check_prompts(spec, conds) -> None:
    """InputError('prompt') when a term's prompt is not the text of the positive conditioning being sampled."""
    from .validation import context_mismatch

    entries = [c.get("model_conds", {}).get("c_crossattn") for c in conds or []]
    contexts = [getattr(e, "cond", None) for e in entries if e is not None]
    for term in spec.terms:
        want = getattr(term, "prompt_context", None)
        if want is None or term.weight == 0.0 or not contexts:
            continue
        where = [context_mismatch(want, c) for c in contexts]
        if all(w is not None for w in where):
            node = "Appearance Picking Guidance" if term.name == "appearance" else "Layout Drawing Guidance"
            raise InputError("prompt", "the text of the positive prompt the sampler is given, encoded by the same "
                             "CLIP (the subject word's token positions are read from it)",
                             f"a prompt that differs from the positive conditioning from token {min(where)} on "
                             f"({node})", "Give the guidance node's prompt and the positive CLIPTextEncode the same text "
                             "(e.g. one String node linked to both)")


# ---------------------------------------------------------------------------------------------------- layers
def _output_level(unet_config: dict, block_id: int) -> int:
    levels = len(unet_config["channel_mult"])
    nrb = unet_config["num_res_blocks"]
    nrb = nrb[0] if isinstance(nrb, (list, tuple)) else nrb
    return levels - 1 - block_id // (nrb + 1)


def parse_layers(model, spec: str, input_name: str = "layers") -> tuple[BlockKey, ...]:
    """Layer selection -> transformer blocks in forward order. Keywords: ``all`` (every block), ``decoder`` (every
    output-block transformer), ``decoder_mid`` (decoder transformers at half the latent resolution: SD1.5 output
    6-8, SDXL output 3-5), ``encoder``, ``middle``; or a comma list of ``input.4``, ``output.3.1`` (block.id[.depth])."""
    keys = transformer_blocks(model)
    cfg = base_model(model).model_config.unet_config
    chosen: set = set()
    require(isinstance(spec, str) and spec.strip() != "", input_name, "'all', 'decoder', 'decoder_mid', 'encoder', "
            "'middle' or a list like 'output.6, output.7.0'", repr(spec))
    for part in [p.strip().lower() for p in spec.split(",") if p.strip()]:
        if part == "all":
            chosen.update(keys)
        elif part == "decoder":
            chosen.update(k for k in keys if k.name == "output")
        elif part == "encoder":
            chosen.update(k for k in keys if k.name == "input")
        elif part == "middle":
            chosen.update(k for k in keys if k.name == "middle")
        elif part == "decoder_mid":
            chosen.update(k for k in keys if k.name == "output" and _output_level(cfg, k.id) == 1)
        else:
            m = re.fullmatch(r"(input|middle|output)\.(\d+)(?:\.(\d+))?", part)
            if m is None:
                raise InputError(input_name, "'all', 'decoder', 'decoder_mid', 'encoder', 'middle' or block names "
                                 "like 'output.6' / 'output.3.1'", repr(part))
            sel = [k for k in keys if k.name == m.group(1) and k.id == int(m.group(2))
                   and (m.group(3) is None or k.index == int(m.group(3)))]
            if not sel:
                raise InputError(input_name, "blocks that have cross-attention in this model",
                                 repr(part), "valid: " + ", ".join(sorted({f"{k.name}.{k.id}" for k in keys})))
            chosen.update(sel)
    require(len(chosen) > 0, input_name, "at least one cross-attention block", repr(spec))
    return tuple(k for k in keys if k in chosen)


# ---------------------------------------------------------------------------------------------------- terms
@dataclass(frozen=True)
class StepRange:
    """Guided while sigma_end < sigma <= sigma_start (half-open: start == end is empty)."""
    sigma_start: float
    sigma_end: float

    def active(self, sigma: float) -> bool:
        return self.sigma_end < sigma <= self.sigma_start

    @classmethod
    def from_percent(cls, model, start: float, end: float) -> "StepRange":
        ms = model.get_model_object("model_sampling")
        return cls(float(ms.percent_to_sigma(start)), float(ms.percent_to_sigma(end)))


@dataclass(frozen=True, eq=False)
class Reference:
    """A reference image for appearance picking: latent (model space, [1,C,h,w]) and optional mask [h,w] at the
    latent resolution (1 = subject)."""
    latent: torch.Tensor
    mask: torch.Tensor | None
    family: str


@dataclass(frozen=True, eq=False)
class AppearanceTerm:
    weight: float
    steps: StepRange
    layers: tuple
    positions: tuple
    tau: float
    step_size: float
    schedule: str
    iterations: int
    reference: Reference
    reference_noise: str
    seed: int
    name: str = "appearance"
    prompt_context: object = None  # guidance.prompt_context of the node's prompt, checked against the sampler's


@dataclass(frozen=True, eq=False)
class LayoutTerm:
    weight: float
    steps: StepRange
    layers: tuple
    positions: tuple
    template_positions: tuple
    template_context: torch.Tensor  # [1, T, C]
    smoothing_sigma: float
    step_size: float
    schedule: str
    template: object = None  # ModelPatcher of a separate template model, or None = this model without patches
    iterations: int = 1
    name: str = "layout"
    prompt_context: object = None  # guidance.prompt_context of the node's prompt, checked against the sampler's


class GuidanceSpec(PatchValue):
    """The immutable set of guidance terms registered on one model (a new object for every node application)."""

    def __init__(self, terms: tuple = ()):
        self.terms = tuple(terms)

    def with_term(self, term) -> "GuidanceSpec":
        return GuidanceSpec(self.terms + (term,))

    def models(self) -> list:
        return [t.template for t in self.terms if getattr(t, "template", None) is not None]


@dataclass
class RunState:
    """Per sampling run: schedule, which schedule steps were guided, inversion trajectories, loss log."""
    sigmas: torch.Tensor
    done: set = field(default_factory=set)
    inversions: dict = field(default_factory=dict)
    log: list = field(default_factory=list)

    def __deepcopy__(self, memo):
        return self

    @property
    def sigma_list(self) -> list:
        cached = self.__dict__.get("_sigma_list")
        if cached is None:  # one device->host copy per run
            cached = self.__dict__["_sigma_list"] = [float(v) for v in self.sigmas.detach().float().cpu()]
        return cached

    def step_index(self, sigma: float) -> int | None:
        s = self.sigma_list
        i = min(range(len(s)), key=lambda j: abs(s[j] - sigma))
        return i if abs(s[i] - sigma) <= 1e-4 * max(1.0, abs(sigma)) else None


LAST_RUN_LOG: list = []  # diagnostics: the loss log of the most recent guided run in this process


# ---------------------------------------------------------------------------------------------------- recording
class StopForward(Exception):
    """Raised after the last block the losses read: the rest of the UNet forward is skipped."""


class Recording:
    """What one recorded forward saw (not a dict, so ComfyUI's nested-dict merge shares it instead of copying).

    maps[key]: [rows, tokens, context_tokens] cross-attention probabilities averaged over heads (float32);
    feats[key]: [rows, tokens, C] the normed hidden states entering attn2 (what its queries are projected from)."""

    def __init__(self, model, keys, rows: int, want_feats=(), stop: bool = True):
        self.keys = frozenset(keys)
        self.feat_keys = frozenset(want_feats)
        self.rows = rows
        self.maps: dict = {}
        self.feats: dict = {}
        self.grids: dict = {}
        self.last = max(keys, key=_order(model).index) if (keys and stop) else None
        self.modules = {k: attention_module(model, k, "attn2") for k in keys}


_ORDER_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _order(model) -> list:
    bm = base_model(model)
    if bm not in _ORDER_CACHE:
        _ORDER_CACHE[bm] = transformer_blocks(bm)
    return _ORDER_CACHE[bm]


def cross_attention_probs(attn2, n: torch.Tensor, context: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) of one cross-attention layer, averaged over heads: [B, T, Tk] float32."""
    q = attn2.to_q(n)
    k = attn2.to_k(context)
    b, t, hd = q.shape
    d = hd // heads
    qh = q.float().view(b, t, heads, d).transpose(1, 2)
    kh = k.float().view(b, k.shape[1], heads, d).transpose(1, 2)
    w = torch.softmax((qh @ kh.transpose(-1, -2)) * d ** -0.5, dim=-1)
    return w.mean(dim=1)


class AttnRecorder(PatchValue):
    """attn2_patch added to the guided calls only: records maps/features at the chosen blocks, leaves the block's
    computation unchanged, raises StopForward after the last chosen block."""

    def __call__(self, n, context, value, extra_options):
        rec: Recording | None = extra_options.get(REC_KEY)
        if rec is None:
            return n, context, value
        key = BlockKey.from_options(extra_options)
        if key in rec.keys and context is not None:
            nr, cr = n[:rec.rows], context[:rec.rows]
            if cr.shape[0] != nr.shape[0]:
                cr = cr.expand(nr.shape[0], -1, -1)
            rec.maps[key] = cross_attention_probs(rec.modules[key], nr, cr, int(extra_options["n_heads"]))
            if key in rec.feat_keys:
                rec.feats[key] = nr
            rec.grids[key] = token_grid(extra_options)
            if key == rec.last:
                raise StopForward()
        return n, context, value


RECORDER = AttnRecorder()


def _with_recording(model_options: dict, rec: Recording, plain: bool = False) -> dict:
    mo = dict(model_options)
    to = {} if plain else dict(mo.get("transformer_options", {}))
    if plain:
        src = model_options.get("transformer_options", {})
        for k in ("sample_sigmas",):
            if k in src:
                to[k] = src[k]
        # "without patches" still feeds the UNet the inputs it takes: DIFFUSION_MODEL wrappers (the location channel
        # of a 5-channel Subject-Diffusion UNet) stay
        wr = src.get("wrappers", {}).get("diffusion_model")
        if wr:
            to["wrappers"] = {"diffusion_model": wr}
        mo = {}
    patches = {k: list(v) for k, v in to.get("patches", {}).items()}
    patches["attn2_patch"] = patches.get("attn2_patch", []) + [RECORDER]
    to["patches"] = patches
    to[REC_KEY] = rec
    to.pop(RUN_KEY, None)
    mo["transformer_options"] = to
    return mo


def record(model, conds, x, timestep, model_options, keys, want_feats=(), plain=False, stop=True,
           output: list | None = None) -> Recording:
    """Run the UNet (``model`` = BaseModel) on ``x`` with ``conds`` (processed conds, one group) through ComfyUI's
    calc_cond_batch and return what the chosen blocks saw. ``stop=False`` runs the whole UNet and appends the
    denoised prediction to ``output``."""
    import comfy.samplers

    rec = Recording(model, keys, x.shape[0], want_feats, stop)
    try:
        out = comfy.samplers.calc_cond_batch(model, [conds], x, timestep, _with_recording(model_options, rec, plain))
        if output is not None:
            output.append(out[0])
    except StopForward:
        pass
    missing = [k for k in keys if k not in rec.maps]
    if missing:
        raise RuntimeError(f"Pick-and-Draw: no cross-attention recorded at {missing[:3]} (another patch replaced the "
                           "whole transformer block?)")
    return rec


# ---------------------------------------------------------------------------------------------------- autograd
def _grad_forward(inner, conds, xg, t, model_options, keys, feat_keys, state: dict) -> Recording:
    """The guided forward with gradients: UNet parameters aliased out of inference mode; if another inference tensor
    still reaches autograd, retried once under the per-op InferenceAlias mode (kept for the rest of the step)."""
    with ParamAlias(base_model(inner).diffusion_model):
        if not state.get("per_op"):
            try:
                return record(inner, conds, xg, t, model_options, keys, want_feats=feat_keys)
            except RuntimeError as e:
                if "nference tensor" not in str(e):
                    raise
                state["per_op"] = True
                log.info("Pick-and-Draw: an inference tensor outside the UNet's parameters needs gradients; using "
                         "the per-op aliasing mode")
        with InferenceAlias():
            return record(inner, conds, xg, t, model_options, keys, want_feats=feat_keys)


# ---------------------------------------------------------------------------------------------------- losses
def subject_map(rec: Recording, keys, positions, row: int, size: tuple) -> torch.Tensor:
    """Mean over ``keys`` of the subject tokens' maps for one row, at ``size``, min-max normalised to [0, 1]."""
    acc = None
    for k in keys:
        h, w = rec.grids[k]
        m = rec.maps[k][row][:, list(positions)].mean(-1).view(1, 1, h, w).float()
        if (h, w) != tuple(size):
            m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        acc = m if acc is None else acc + m
    acc = acc[0, 0] / len(keys)
    lo, hi = acc.min(), acc.max()
    return (acc - lo) / (hi - lo).clamp_min(1e-12)


def _finest(rec: Recording, keys) -> tuple:
    return max((rec.grids[k] for k in keys), key=lambda g: g[0] * g[1])


def _resize_mask(mask: torch.Tensor, size: tuple) -> torch.Tensor:
    m = mask.float().view(1, 1, *mask.shape[-2:])
    out = F.interpolate(m, size=size, mode="area")[0, 0] >= 0.5 if tuple(mask.shape[-2:]) != tuple(size) else m[0, 0] >= 0.5
    if not bool(out.any()):
        out = F.adaptive_max_pool2d(m, size)[0, 0] > 0
    return out


def saliency_masks(rec: Recording, keys, positions, row: int, tau: float) -> dict:
    """Binary subject masks per block: the aggregated subject map thresholded at tau, resized to each block's grid
    (never empty: the map's maximum is 1 after normalisation)."""
    size = _finest(rec, keys)
    m = subject_map(rec, keys, positions, row, size).detach()
    sal = (m >= tau).float()
    return {k: _resize_mask(sal, rec.grids[k]) for k in keys}


def uremd(gen: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Unidirectional relaxed EMD, cosine cost: mean_i min_j (1 - cos(g_i, p_j))."""
    g = F.normalize(gen.float(), dim=-1)
    p = F.normalize(palette.float(), dim=-1)
    cost = 1.0 - g @ p.transpose(0, 1)
    return cost.min(dim=1).values.mean()


def gaussian_kernel(sigma: float, device) -> torch.Tensor:
    r = max(1, int(math.ceil(3.0 * sigma)))
    xs = torch.arange(-r, r + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (xs / sigma) ** 2)
    k = k / k.sum()
    return (k[:, None] * k[None, :])[None, None]


def smooth(m: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of one [h, w] map (reflect padding); sigma in cells of that map's grid; 0 = none."""
    if sigma <= 0:
        return m
    k = gaussian_kernel(sigma, m.device)
    r = k.shape[-1] // 2
    x = m.view(1, 1, *m.shape)
    mode = "reflect" if min(m.shape) > r else "replicate"
    return F.conv2d(F.pad(x, (r, r, r, r), mode=mode), k)[0, 0]


def appearance_loss(term: AppearanceTerm, rec: Recording, palette: dict) -> torch.Tensor:
    total = 0.0
    for r in range(rec.rows):
        masks = saliency_masks(rec, term.layers, term.positions, r, term.tau)
        per = [uremd(rec.feats[k][r][masks[k].flatten()], palette[k]) for k in term.layers]
        total = total + torch.stack(per).mean()
    return total


def layout_loss(term: LayoutTerm, rec: Recording, tmpl: Recording) -> torch.Tensor:
    total = 0.0
    for r in range(rec.rows):
        for k in term.layers:
            h, w = rec.grids[k]
            a = rec.maps[k][r][:, list(term.positions)].mean(-1).view(h, w)
            b = tmpl.maps[k][r][:, list(term.template_positions)].mean(-1).view(h, w)
            total = total + torch.linalg.matrix_norm(smooth(a, term.smoothing_sigma) - smooth(b, term.smoothing_sigma),
                                                     ord="fro")
    return total


# ---------------------------------------------------------------------------------------------------- engine
def _ref_conds(conds):
    out = []
    for c in conds:
        c = dict(c)
        for k in ("control", "gligen", "area", "mask", "hooks"):
            c.pop(k, None)
        out.append(c)
    return out


def _template_conds(conds, context: torch.Tensor):
    import comfy.conds

    out = []
    for c in conds:
        c = dict(c)
        mc = dict(c.get("model_conds", {}))
        mc["c_crossattn"] = comfy.conds.CONDCrossAttn(context)
        c["model_conds"] = mc
        out.append(c)
    return out


def _eps(model, conds, x, sigma: float, model_options) -> torch.Tensor:
    import comfy.samplers

    t = torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype)
    den = comfy.samplers.calc_cond_batch(model, [conds], x, t, model_options)[0]
    return (x - den) / sigma


def _reference_latent(term: AppearanceTerm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    ref = term.reference
    lat = ref.latent.to(x.device, torch.float32)
    mask = ref.mask
    h, w = x.shape[-2:]
    if tuple(lat.shape[-2:]) != (h, w):
        lat = F.interpolate(lat, size=(h, w), mode="bilinear", align_corners=False)
    if mask is not None:
        mask = mask.to(x.device)
        if tuple(mask.shape[-2:]) != (h, w):
            mask = _resize_mask(mask, (h, w)).float()
    return lat.to(x.dtype), mask


def _renoised(term, model, x, sigma: float) -> torch.Tensor:
    lat, _ = _reference_latent(term, x)
    noise = seeded_noise(lat.shape, term.seed, sigma, lat.device, lat.dtype)
    ms = model.model_sampling
    return ms.noise_scaling(torch.tensor([sigma], device=lat.device, dtype=lat.dtype).view(-1, 1, 1, 1), noise, lat)


def _palette_from(term: AppearanceTerm, rec: Recording, x) -> dict:
    _, mask = _reference_latent(term, x)
    if mask is not None:
        masks = {k: _resize_mask(mask, rec.grids[k]) for k in term.layers}
    else:
        masks = saliency_masks(rec, term.layers, term.positions, 0, term.tau)
    return {k: rec.feats[k][0][masks[k].flatten()].detach() for k in term.layers}


def _ddim_palettes(term: AppearanceTerm, run: RunState, model, conds, x, model_options) -> dict:
    """DDIM inversion of the reference (deterministic Euler in sigma space) up to the highest guided sigma, once per
    run; the UNet pass that gives eps at (x_s, s) also records the palette for sigma s (no separate palette pass)."""
    key = (id(term), tuple(x.shape[-2:]))
    pal = run.inversions.get(key)
    if pal is not None:
        return pal
    lat, _ = _reference_latent(term, x)
    sig = [s for s in run.sigma_list if s > 0.0]
    guided = [s for s in sig if term.steps.active(s)]
    top = max(guided) if guided else max(sig)
    ascending = sorted(s for s in sig if s <= top + 1e-6)
    pal = {}
    cur, prev = lat, None
    for s in ascending:
        if prev is None:  # x_{s_min} = x_0 + s_min * eps(x_0, s_min)
            cur = lat + s * _eps(model, conds, lat, s, model_options)
        else:
            t = torch.full((1,), prev, device=x.device, dtype=x.dtype)
            out: list = []
            rec = record(model, conds, cur, t, model_options, term.layers, want_feats=term.layers, stop=False,
                         output=out)
            if any(abs(prev - g) <= 1e-6 * max(1.0, g) for g in guided):
                pal[round(prev, 6)] = _palette_from(term, rec, x)
            cur = cur + (s - prev) * (cur - out[0]) / prev
        prev = s
    t = torch.full((1,), top, device=x.device, dtype=x.dtype)  # the top sigma: features of the last point
    rec = record(model, conds, cur, t, model_options, term.layers, want_feats=term.layers)
    pal[round(top, 6)] = _palette_from(term, rec, x)
    run.inversions[key] = pal
    return pal


def _palette(term: AppearanceTerm, run, model, conds, x, sigma, model_options) -> dict:
    if term.reference_noise == "ddim_inversion":
        pal = _ddim_palettes(term, run, model, conds, x, model_options)
        best = min(pal, key=lambda s: abs(s - sigma))
        return pal[best]
    xr = _renoised(term, model, x, sigma)
    t = torch.full((1,), sigma, device=x.device, dtype=x.dtype)
    rec = record(model, conds, xr, t, model_options, term.layers, want_feats=term.layers)
    return _palette_from(term, rec, x)


def _step_size(term, run: RunState, sigma: float) -> float:
    if term.schedule == "constant":
        return term.step_size
    sig = run.sigma_list
    active = [s for s in sig if term.steps.active(s)]
    if len(active) <= 1:
        return term.step_size
    i = min(range(len(active)), key=lambda j: abs(active[j] - sigma))
    return term.step_size * (1.0 - 0.5 * i / (len(active) - 1))


def _template_recording(term: LayoutTerm, inner, conds, x, t, model_options) -> Recording:
    tconds = _template_conds(conds, term.template_context.to(x.device))
    if term.template is not None:
        tm = term.template
        return record(tm.model, tconds, x, t, tm.model_options, term.layers)
    return record(inner, tconds, x, t, model_options, term.layers, plain=True)


def guide_step(inner, conds, x: torch.Tensor, timestep, model_options: dict, terms, run: RunState) -> torch.Tensor:
    """The guided update of one step: returns the new latent (a normal, non-inference tensor)."""
    sigma = float(timestep.max())
    ms = inner.model_sampling
    c_in = float(ms.calculate_input(torch.tensor([sigma]), torch.ones(1, 1, 1, 1)).flatten()[0])
    with torch.inference_mode(False):
        xg = x.detach().clone()
        t = timestep.detach().clone()
        with torch.no_grad():
            targets = {}
            for term in terms:
                if isinstance(term, AppearanceTerm):
                    targets[id(term)] = _palette(term, run, inner, _ref_conds(conds), xg, sigma, model_options)
                else:
                    targets[id(term)] = _template_recording(term, inner, conds, xg, t, model_options)
        keys = sorted({k for term in terms for k in term.layers}, key=_order(inner).index)
        feat_keys = {k for term in terms if isinstance(term, AppearanceTerm) for k in term.layers}
        iterations = max(int(getattr(term, "iterations", 1)) for term in terms)
        etas = {id(term): _step_size(term, run, sigma) for term in terms}
        alias_state: dict = {}
        entry = {"sigma": sigma, "rows": int(xg.shape[0]), "iterations": [], "backward_passes": 0}
        for it in range(iterations):
            with torch.enable_grad():
                xg = xg.detach().requires_grad_(True)
                rec = _grad_forward(inner, conds, xg, t, model_options, keys, feat_keys, alias_state)
                losses, objective = {}, 0.0
                for term in terms:
                    if isinstance(term, AppearanceTerm):
                        L = appearance_loss(term, rec, targets[id(term)])
                    else:
                        L = layout_loss(term, rec, targets[id(term)])
                    losses[term.name] = L.detach()  # read back after the step: no device sync per loss
                    objective = objective + etas[id(term)] * term.weight * L
                entry["recorded_rows"] = rec.rows
                (grad,) = torch.autograd.grad(objective, [xg])  # one backward over the sum of the active losses
                entry["backward_passes"] += 1
            with torch.no_grad():
                xg = xg.detach() - grad / (c_in * c_in)
            entry["iterations"].append(losses)
            entry["per_op_alias"] = bool(alias_state.get("per_op"))
            del rec, grad
        entry["iterations"] = [{k: float(v) for k, v in it.items()} for it in entry["iterations"]]
        run.log.append(entry)
        return xg.detach()


# ---------------------------------------------------------------------------------------------------- wrappers
def sampler_sample_wrapper(executor, guider, sigmas, extra_args, callback, noise, *args, **kwargs):
    """SAMPLER_SAMPLE: a fresh RunState for each sampling run (nothing carries over to the next prompt)."""
    global LAST_RUN_LOG
    mo = extra_args.get("model_options", {})
    to = dict(mo.get("transformer_options", {}))
    spec = to.get(SPEC_KEY)
    if isinstance(spec, GuidanceSpec):
        check_prompts(spec, getattr(guider, "conds", {}).get("positive"))  # before the first step
    run = RunState(sigmas=sigmas)
    to[RUN_KEY] = run
    extra_args = {**extra_args, "model_options": {**mo, "transformer_options": to}}
    try:
        return executor(guider, sigmas, extra_args, callback, noise, *args, **kwargs)
    finally:
        LAST_RUN_LOG = run.log


def predict_noise_wrapper(executor, x, timestep, model_options={}, seed=None):
    """PREDICT_NOISE: at a guided step, update the sampler's latent in place, then denoise as usual."""
    to = model_options.get("transformer_options", {})
    spec: GuidanceSpec | None = to.get(SPEC_KEY)
    run: RunState | None = to.get(RUN_KEY)
    if spec is None or run is None:
        return executor(x, timestep, model_options, seed)
    sigma = float(timestep.max())
    terms = [t for t in spec.terms if t.weight != 0.0 and t.steps.active(sigma)]
    if not terms:
        return executor(x, timestep, model_options, seed)
    i = run.step_index(sigma)
    if i is None or i in run.done:  # second-order samplers' extra evaluations are not guided
        return executor(x, timestep, model_options, seed)
    run.done.add(i)
    guider = executor.class_obj
    conds = guider.conds.get("positive")
    if not conds:
        return executor(x, timestep, model_options, seed)
    for term in terms:
        if len(term.positions) and max(term.positions) >= _context_tokens(conds):
            raise InputError("prompt", "the text of the positive prompt connected to the sampler",
                             "a prompt longer than the positive conditioning")
    x_new = guide_step(guider.inner_model, conds, x, timestep, model_options, terms, run)
    x.copy_(x_new.to(x.dtype))  # the sampler's own latent: the update carries into its state
    return executor(x, timestep, model_options, seed)


def _context_tokens(conds) -> int:
    for c in conds:
        mc = c.get("model_conds", {}).get("c_crossattn")
        if mc is not None:
            return int(mc.cond.shape[1])
    return 10 ** 9


def add_term(model, term):
    """A clone of ``model`` with ``term`` added to its guidance (new GuidanceSpec object; wrappers once)."""
    import comfy.patcher_extension as pe

    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    old = to.get(SPEC_KEY)
    spec = (old if isinstance(old, GuidanceSpec) else GuidanceSpec()).with_term(term)
    to[SPEC_KEY] = spec
    if not m.get_wrappers(pe.WrappersMP.PREDICT_NOISE, WRAPPER_KEY):
        m.add_wrapper_with_key(pe.WrappersMP.PREDICT_NOISE, WRAPPER_KEY, predict_noise_wrapper)
        m.add_wrapper_with_key(pe.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY, sampler_sample_wrapper)
    models = spec.models()
    if models:
        m.set_additional_models(WRAPPER_KEY, models)
    return m


def find_spec(model) -> GuidanceSpec | None:
    return model.model_options.get("transformer_options", {}).get(SPEC_KEY)
