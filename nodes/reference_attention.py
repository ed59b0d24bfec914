"""Reference Self-Attention (RSA): the base UNet's self-attention also attends to a reference's tokens.

For a base feature f and reference features f_ref taken at the same block (BootPIG, arXiv 2401.13974, Eq. 2-3):

    RSA(f, f_ref) = W_o softmax(q(f) [k(f); k(s * f_ref)]^T) [v(f); v(f_ref)]

with the layer's own weights and ``s = ref_scale`` scaling the reference tokens before the key projection only
(official code, ``AttnProcessor2_0_withScaling``). Several references are pooled per pixel (paper Eq. 5-8:
``o + sum_i softmax_i(||o_i - o||) (o_i - o)``), per token by the largest delta (official code), averaged, or
concatenated into one sequence.

How it runs inside ComfyUI, per UNet call (one ``APPLY_MODEL`` wrapper, one ``attn1_patch``, one ``attn1`` replace
per transformer block, all immutable values registered on a clone):

1. The wrapper decides whether the call is in range (sigma within [sigma_end, sigma_start], strength > 0). If not,
   the model runs untouched: output identical to the unpatched model.
2. It plans rows: conditional rows use the reference, unconditional rows run plain self-attention (unless the
   three-branch guidance asks for "reference + negative text"). One reference set per conditioning chunk (or one
   shared set when a reference prompt is given).
3. Reference tokens: the clean reference latents are noised to this call's sigma with fresh noise (seeded by the
   seed and sigma: no state), then either
   - *batched* (the reference encoder shares the base weights: reference-attention mode) - appended as extra rows to
     this very UNet call, where their normed attn1 inputs are read in the same pass; or
   - *bank* (a separately trained reference UNet, ControlNet inputs, or ``once``) - run through the reference
     encoder once with a collector patch; ``once`` encodes at one fixed sigma per sampling run and reuses it.
4. The attn1_patch extends keys/values with the reference tokens; the attn1 replace computes plain attention for
   rows without a reference and pooled RSA for rows with one. Per-call state lives in the per-call
   ``transformer_options`` and is dropped after the call.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field

import torch

from .attention import PatchValue, attention, with_attn1_collector
from .forward_process import seeded_noise
from .images import fit_latent
from .introspect import BlockKey, attention_module, transformer_blocks

POOLING_MODES = ("softmax", "argmax", "concat", "mean")
FEATURE_MODES = ("per_step", "once")


# ----------------------------------------------------------------------------------------------- the reference value
@dataclass(frozen=True, eq=False)
class ReferenceSet:
    """Encoded references (the BOOTPIG_REFERENCE value). Immutable; shared, never copied, by clones."""

    latents: torch.Tensor            # [N, C, s, s] clean latents in model space (process_latent_in applied), CPU
    white: torch.Tensor              # [C] the latent of a white image (padding for other aspects)
    encoder: object                  # ModelPatcher of the reference UNet
    family: str
    context: torch.Tensor | None = None   # [1, T, D] reference prompt embedding, or None: use each row's prompt
    seed: int = 0

    def __deepcopy__(self, memo):
        return self

    @property
    def count(self) -> int:
        return int(self.latents.shape[0])


@dataclass(frozen=True)
class RSASettings:
    ref_scale: float = 1.1
    strength: float = 1.0
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    pooling: str = "softmax"
    features: str = "per_step"
    once_sigma: float = 1.0
    batched: bool = True             # the reference encoder shares the base weights: one UNet call for both

    def active(self, sigma: float) -> bool:
        return self.strength != 0.0 and self.sigma_end <= sigma <= self.sigma_start


# -------------------------------------------------------------------------------------------------------- pooling
def pool(o: torch.Tensor, deltas: list[torch.Tensor], mode: str, norms_from: list[torch.Tensor] | None = None):
    """Combine the reference-less output ``o`` [B,T,C] with per-reference deltas ``o_i - o``.

    softmax: o + sum_i p_i d_i, p = softmax over i of ||d_i|| per token (paper Eq. 5-8)
    argmax:  o + d_j, j = argmax_i ||d_i|| per token (official code)
    mean:    o + mean_i d_i
    ``norms_from``: the tensors whose per-token norms rank the references (the deltas after the output projection,
    as the paper measures them on attention outputs); defaults to ``deltas``.
    """
    if len(deltas) == 1:
        return o + deltas[0]
    d = torch.stack(deltas)                                                    # [N, B, T, C]
    ref = torch.stack(norms_from) if norms_from is not None else d
    norms = ref.float().norm(dim=-1)                                           # [N, B, T]
    if mode == "softmax":
        w = torch.softmax(norms, dim=0)
    elif mode == "argmax":
        w = torch.nn.functional.one_hot(norms.argmax(dim=0), num_classes=d.shape[0]).permute(2, 0, 1).float()
    elif mode == "mean":
        w = torch.full_like(norms, 1.0 / d.shape[0])
    else:
        raise ValueError(f"pooling must be one of softmax, argmax, mean (concat is a single attention), got {mode!r}")
    return o + (w.unsqueeze(-1).to(d.dtype) * d).sum(dim=0)


# ------------------------------------------------------------------------------------------------------ call plan
@dataclass
class CallState:
    """Per-call plan, stored in the per-call transformer_options and dropped with it. Index tensors are built once per
    UNet call on the CPU side of the plan, so the hot path (every attention block) never syncs with the device."""

    settings: RSASettings
    n_refs: int
    ref_index: torch.Tensor          # [rows, N] row of the token source holding reference i for each row
    uses_ref: torch.Tensor           # [rows] bool
    all_ref: bool
    none_ref: bool
    bank: dict | None = None         # BlockKey -> [R, T, C] (bank mode) or None (batched: rows of the same call)
    idx_ref: torch.Tensor | None = None
    idx_plain: torch.Tensor | None = None
    _scale: dict = field(default_factory=dict)

    def __post_init__(self):
        uses = self.uses_ref.cpu()
        dev = self.uses_ref.device
        if self.idx_ref is None:
            self.idx_ref = torch.nonzero(uses, as_tuple=True)[0].to(dev)
        if self.idx_plain is None:
            self.idx_plain = torch.nonzero(~uses, as_tuple=True)[0].to(dev)
        self._uses_cpu = uses

    def key_scale(self, dtype) -> torch.Tensor:
        """[rows, 1, 1]: ref_scale on rows that read references, 1 elsewhere (their extra keys are ignored)."""
        if dtype not in self._scale:
            vals = torch.where(self._uses_cpu, torch.tensor(float(self.settings.ref_scale)), torch.tensor(1.0))
            self._scale[dtype] = vals.view(-1, 1, 1).to(device=self.uses_ref.device, dtype=dtype)
        return self._scale[dtype]


class RunCache:
    """Per-sampling-run cache (features computed ``once``); made fresh by an OUTER_SAMPLE wrapper for each run."""

    def __init__(self):
        self.banks: dict = {}

    def __deepcopy__(self, memo):
        return self


_noise = seeded_noise  # one formula for seeded noise per (seed, sigma): nodes/forward_process.py


class RSAPatch(PatchValue):
    """One RSA patch: APPLY_MODEL wrapper + attn1_patch + attn1 replace (one object serving all three roles)."""

    def __init__(self, reference: ReferenceSet, settings: RSASettings, base_model=None):
        self.reference = reference
        self.settings = settings
        self.uid = uuid.uuid4().hex[:8]
        self.state_key = f"personalize.rsa.{self.uid}"
        self.bank_key = f"personalize.rsa.bank.{self.uid}"
        self.run_key = f"personalize.rsa.run.{self.uid}"
        self.force_key = f"personalize.rsa.ref_on_uncond.{self.uid}"
        # output projections per block, for ranking several references by the norm of their projected deltas
        self._to_out = {}
        if base_model is not None:
            for key in transformer_blocks(base_model):
                self._to_out[key] = attention_module(base_model, key, "attn1").to_out[0]

    def models(self):
        return [] if self.settings.batched else [self.reference.encoder]

    # ---------------------------------------------------------------------------------- OUTER_SAMPLE wrapper
    def outer_sample(self, executor, *args, **kwargs):
        guider = executor.class_obj
        old = guider.model_options
        to = dict(old.get("transformer_options", {}))
        to[self.run_key] = RunCache()
        guider.model_options = {**old, "transformer_options": to}
        try:
            return executor(*args, **kwargs)
        finally:
            guider.model_options = old

    # ----------------------------------------------------------------------------------- APPLY_MODEL wrapper
    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                    **kwargs):
        s = self.settings
        sigma = float(t.max())
        if not s.active(sigma) or c_crossattn is None:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        ref = self.reference
        B = x.shape[0]
        chunks = list(transformer_options.get("cond_or_uncond") or [0])
        per = B // len(chunks)
        force = bool(transformer_options.get(self.force_key))
        chunk_uses = [c == 0 or force for c in chunks]
        shared_ctx = ref.context is not None
        # groups of reference rows: one per chunk that uses the reference, or one shared set
        groups = [0] if shared_ctx and any(chunk_uses) else [i for i, u in enumerate(chunk_uses) if u]
        if not groups:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        N = ref.count
        h, w = x.shape[-2:]
        dev, dt = x.device, x.dtype
        latents = fit_latent(ref.latents.to(dev, torch.float32), h, w, ref.white.to(dev, torch.float32))
        ms = executor.class_obj.model_sampling

        def group_context(g):
            if shared_ctx:
                return ref.context.to(dev, c_crossattn.dtype)
            return c_crossattn[g * per: g * per + 1]

        batched = (s.batched and s.features == "per_step" and control is None
                   and (not shared_ctx or ref.context.shape[1] == c_crossattn.shape[1]))
        # token sources: rows of this call (batched) or a bank appended after them
        rows = B + (len(groups) * N if batched else 0)
        src_rows = rows if batched else B + len(groups) * N
        ref_index = torch.arange(rows).unsqueeze(1).repeat(1, N)
        uses = torch.zeros(rows, dtype=torch.bool)
        for gi, g in enumerate(groups):
            members = [c for c in range(len(chunks)) if chunk_uses[c]] if shared_ctx else [g]
            for c in members:
                for r in range(c * per, (c + 1) * per):
                    uses[r] = True
                    ref_index[r] = B + gi * N + torch.arange(N)
        assert int(ref_index.max()) < src_rows
        to = dict(transformer_options)
        state = CallState(s, N, ref_index.to(dev), uses.to(dev), all_ref=bool(uses.all()), none_ref=not bool(uses.any()))
        to[self.state_key] = state

        def noisy(sig):
            n = _noise((len(groups) * N,) + tuple(latents.shape[1:]), ref.seed, sig, dev, torch.float32)
            lat = latents.repeat(len(groups), 1, 1, 1)
            sig_t = torch.full((lat.shape[0],), sig, device=dev, dtype=torch.float32)
            return ms.noise_scaling(sig_t.view(-1, 1, 1, 1), n, lat).to(dt), sig_t.to(t.dtype)

        if batched:
            xr, tr = noisy(sigma)
            ctx = torch.cat([group_context(g).expand(N, -1, -1) for g in groups])
            x2 = torch.cat([x, xr])
            t2 = torch.cat([t, tr])
            cc2 = torch.cat([c_crossattn, ctx.to(c_crossattn.dtype)])
            cat2 = None if c_concat is None else torch.cat(
                [c_concat] + [c_concat[g * per: g * per + 1].expand(N, *c_concat.shape[1:]) for g in groups])
            kw2 = {}
            for k, v in kwargs.items():
                if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == B:
                    v = torch.cat([v] + [v[g * per: g * per + 1].expand(N, *v.shape[1:]) for g in groups])
                kw2[k] = v
            out = executor(x2, t2, cat2, cc2, control, to, **kw2)
            return out[:B]

        state.bank = self._bank(executor, transformer_options, groups, group_context, noisy, sigma, kwargs, per, N,
                                (h, w))
        return executor(x, t, c_concat, c_crossattn, control, to, **kwargs)

    def _bank(self, executor, transformer_options, groups, group_context, noisy, sigma, kwargs, per, N, hw):
        s = self.settings
        run = transformer_options.get(self.run_key)
        key = None
        if s.features == "once":
            uuids = transformer_options.get("uuids") or []
            key = (hw, tuple(str(uuids[g]) if g < len(uuids) else g for g in groups))
            if run is not None and key in run.banks:
                return run.banks[key]
        sig = s.once_sigma if s.features == "once" else sigma
        xr, tr = noisy(sig)
        ctx = torch.cat([group_context(g).expand(N, -1, -1) for g in groups])
        enc = executor.class_obj if s.batched else self.reference.encoder.model
        enc_to = {} if s.batched else dict(self.reference.encoder.model_options.get("transformer_options", {}))
        enc_to = {k: v for k, v in enc_to.items() if k not in ("wrappers", "callbacks")}
        enc_to, bank = with_attn1_collector(enc_to, self.bank_key)
        extra = {}
        y = kwargs.get("y")
        if y is not None:
            extra["y"] = torch.cat([y[g * per: g * per + 1].expand(N, *y.shape[1:]) for g in groups])
        enc.apply_model(xr, tr, c_crossattn=ctx, transformer_options=enc_to, **extra)
        if key is not None and run is not None:
            run.banks[key] = bank
        return bank

    # --------------------------------------------------------------------------------------------- attn1_patch
    def __call__(self, n, context, value, extra_options):
        state: CallState | None = extra_options.get(self.state_key)
        if state is None or state.none_ref:
            return n, context, value
        if state.bank is not None:
            feats = state.bank.get(BlockKey.from_options(extra_options))
            if feats is None:
                return n, context, value
            src = torch.cat([n, feats.to(n.dtype)])
        else:
            src = n
        scale = state.key_scale(n.dtype)
        ks, vs = [n], [n]
        for i in range(state.n_refs):
            r = src[state.ref_index[:, i]]
            ks.append(r * scale)
            vs.append(r)
        return n, torch.cat(ks, dim=1), torch.cat(vs, dim=1)

    # ------------------------------------------------------------------------------------------ attn1 replace
    def replace(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        state: CallState | None = extra_options.get(self.state_key)
        T = q.shape[1]
        if state is None or state.none_ref or k.shape[1] == T:
            return attention(q, k[:, :T], v[:, :T], heads, extra_options)
        s = self.settings
        if state.all_ref or (s.strength == 1.0 and (state.n_refs == 1 or s.pooling == "concat")):
            # one attention for every row: rows without a reference carry copies of their own keys/values, and a
            # softmax over duplicated keys equals plain self-attention, so no gather/scatter is needed
            return self._rsa(q, k, v, heads, extra_options, T)
        out = torch.empty_like(q)
        idx_ref, idx_plain = state.idx_ref, state.idx_plain
        out[idx_plain] = attention(q[idx_plain], k[idx_plain, :T], v[idx_plain, :T], heads, extra_options)
        out[idx_ref] = self._rsa(q[idx_ref], k[idx_ref], v[idx_ref], heads, extra_options, T)
        return out

    def _rsa(self, q, k, v, heads, extra_options, T):
        s = self.settings
        N = (k.shape[1] - T) // T
        if s.pooling == "concat" or (N == 1 and s.strength == 1.0):
            full = attention(q, k, v, heads, extra_options)
            if s.strength == 1.0:
                return full
            o = attention(q, k[:, :T], v[:, :T], heads, extra_options)
            return o + s.strength * (full - o)
        ks, vs = k[:, :T], v[:, :T]
        o = attention(q, ks, vs, heads, extra_options)
        deltas = []
        for i in range(N):
            sl = slice(T * (i + 1), T * (i + 2))
            oi = attention(q, torch.cat([ks, k[:, sl]], dim=1), torch.cat([vs, v[:, sl]], dim=1), heads, extra_options)
            deltas.append(oi - o)
        norms_from = None
        if N > 1 and s.pooling in ("softmax", "argmax"):
            lin = self._to_out.get(BlockKey.from_options(extra_options))
            if lin is not None:
                bias = lin.bias
                norms_from = [lin(d) - (bias.to(d) if bias is not None else 0) for d in deltas]
        pooled = pool(o, deltas, s.pooling, norms_from)
        return pooled if s.strength == 1.0 else o + s.strength * (pooled - o)


# ---------------------------------------------------------------------------------------------- three-branch CFG
class ThreeBranchGuidance(PatchValue):
    """BootPIG's guidance: eps = eps_u + image_scale (eps_ref - eps_u) + text_scale (eps_ref+text - eps_ref), where
    eps_u is negative text without the reference, eps_ref negative text with it, eps_ref+text the prompt with it.
    A post-CFG function (computed on denoised x0, which is affine in eps): one extra batch per guided step."""

    def __init__(self, patch: RSAPatch, image_scale: float, text_scale: float):
        self.patch, self.image_scale, self.text_scale = patch, image_scale, text_scale

    def __call__(self, args):
        import comfy.samplers

        uncond_d, cond_d, uncond = args["uncond_denoised"], args["cond_denoised"], args["uncond"]
        if uncond_d is None or uncond is None or not self.patch.settings.active(float(args["sigma"].max())):
            return args["denoised"]
        mo = args["model_options"]
        to = dict(mo.get("transformer_options", {}))
        to[self.patch.force_key] = True
        (ref_d,) = comfy.samplers.calc_cond_batch(args["model"], [uncond], args["input"], args["sigma"],
                                                  {**mo, "transformer_options": to})
        return uncond_d + self.image_scale * (ref_d - uncond_d) + self.text_scale * (cond_d - ref_d)


def find_rsa(model) -> RSAPatch | None:
    for p in model.model_options.get("transformer_options", {}).get("patches", {}).get("attn1_patch", []):
        if isinstance(p, RSAPatch):
            return p
    return None


def apply_rsa(model, reference: ReferenceSet, settings: RSASettings, image_scale: float | None = None,
              text_scale: float | None = None):
    """A clone of ``model`` with RSA registered as new patch objects; ``model`` itself is left untouched."""
    import comfy.patcher_extension as pe

    m = model.clone()
    patch = RSAPatch(reference, settings, base_model=m)
    m.set_model_attn1_patch(patch)
    for key in transformer_blocks(m):
        m.set_model_attn1_replace(patch.replace, key.name, key.id, key.index)
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, patch.state_key, patch.apply_model)
    m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, patch.state_key, patch.outer_sample)
    if image_scale is not None and text_scale is not None:
        m.set_model_sampler_post_cfg_function(ThreeBranchGuidance(patch, image_scale, text_scale),
                                              disable_cfg1_optimization=True)
    return m
