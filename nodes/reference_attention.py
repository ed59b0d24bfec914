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

from .attention import PatchValue, attention, to_device, with_attn1_collector
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
    uncond_reference: bool = False   # under CFG the negative-prompt rows read the reference too (not the paper's)

    def active(self, sigma: float) -> bool:
        return self.strength != 0.0 and self.sigma_end <= sigma <= self.sigma_start

    @property
    def full_range(self) -> bool:
        """Every step is in range (ComfyUI's percent_to_sigma gives 999999999.9 for 0 % and 0 for 100 %): the call's
        sigma never has to be read on the host."""
        return self.sigma_start >= 1e8 and self.sigma_end <= 0.0


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
        # one-hot of the argmax by comparison (F.one_hot validates its input on the host: a device sync per block)
        ids = torch.arange(d.shape[0], device=norms.device).view(-1, 1, 1)
        w = (norms.argmax(dim=0, keepdim=True) == ids).float()
    elif mode == "mean":
        w = torch.full_like(norms, 1.0 / d.shape[0])
    else:
        raise ValueError(f"pooling must be one of softmax, argmax, mean (concat is a single attention), got {mode!r}")
    return o + (w.unsqueeze(-1).to(d.dtype) * d).sum(dim=0)


# ------------------------------------------------------------------------------------------------------ call plan
@dataclass
class CallState:
    """Per-call plan, stored in the per-call transformer_options and dropped with it. The index tensors come from a
    per-layout cache of the patch (built on the host and copied to the device once), so neither the call nor the
    hot path (every attention block) syncs with the device or copies from the host."""

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
        if self.idx_ref is None or self.idx_plain is None:   # built by hand (tests): host tensors
            uses = self.uses_ref.cpu()
            dev = self.uses_ref.device
            self.idx_ref = torch.nonzero(uses, as_tuple=True)[0].to(dev)
            self.idx_plain = torch.nonzero(~uses, as_tuple=True)[0].to(dev)

    def key_scale(self, dtype) -> torch.Tensor:
        """[rows, 1, 1]: ref_scale on rows that read references, 1 elsewhere (their extra keys are ignored). Computed
        on the device, once per plan and dtype."""
        if dtype not in self._scale:
            vals = torch.where(self.uses_ref, float(self.settings.ref_scale), 1.0)
            self._scale[dtype] = vals.view(-1, 1, 1).to(dtype)
        return self._scale[dtype]


class ReferencePrompt:
    """The prompt reference rows are encoded with when the encoder was given none: BootPIG's three-branch guidance
    encodes the reference once with the generation prompt and uses it in both reference branches (official pipeline:
    ``reference_prompt`` defaults to ``prompt``). ``context`` [1, T, D], ``y`` (SDXL pooled/size vector) or None, on
    the host or any device; device copies are cached."""

    def __init__(self, context: torch.Tensor, y: torch.Tensor | None = None):
        self.context, self.y = context[:1], (None if y is None else y[:1])
        self._on: dict = {}

    def __deepcopy__(self, memo):
        return self

    def on(self, device):
        key = str(device)
        if key not in self._on:
            self._on[key] = (to_device(self.context, device),
                             None if self.y is None else to_device(self.y, device))
        return self._on[key]

    @classmethod
    def from_conds(cls, conds) -> "ReferencePrompt | None":
        """From processed sampler conds (the guider's positive): the first entry's cross-attention context and y."""
        for c in conds or []:
            mc = c.get("model_conds", {})
            ca = mc.get("c_crossattn")
            if ca is not None:
                y = mc.get("y")
                return cls(ca.cond, None if y is None else y.cond)
        return None


REFERENCE_PROMPT = "personalize.reference_prompt"


class RunCache:
    """Per-sampling-run cache, made fresh by an OUTER_SAMPLE wrapper for each run: features computed ``once``, the
    run's schedule on the host (read once per run) and the reference noise of every step of it on the device, so a
    UNet call picks its noise by its sigma on the device without reading the sigma back."""

    def __init__(self, sigmas: torch.Tensor | None = None):
        self.banks: dict = {}
        self.noise: dict = {}
        self.sigmas = None
        if isinstance(sigmas, torch.Tensor) and sigmas.numel() > 0:
            self.sigmas = [v for v in sigmas.detach().float().cpu().tolist() if v > 0.0]

    def __deepcopy__(self, memo):
        return self

    def noise_bank(self, seed: int, shape: tuple, settings: RSASettings, device):
        """(schedule [S] and noise [S, *shape] on ``device``) for the run's sigmas inside the patch's range."""
        key = (int(seed), tuple(shape), str(device))
        hit = self.noise.get(key)
        if hit is None:
            sig = [v for v in self.sigmas if settings.sigma_end <= v <= settings.sigma_start] or self.sigmas
            bank = torch.stack([_noise(shape, seed, v, "cpu", torch.float32) for v in sig])
            hit = self.noise[key] = (to_device(torch.tensor(sig, dtype=torch.float32), device),
                                     to_device(bank, device))
        return hit


_noise = seeded_noise  # one formula for seeded noise per (seed, sigma): nodes/forward_process.py


def _fit_tokens(ctx: torch.Tensor, length: int) -> torch.Tensor | None:
    """A context of ``length`` tokens equal in attention to ``ctx`` (ComfyUI repeats contexts to a common length when
    it batches prompts of different lengths: attention over repeated keys is unchanged), or None."""
    t = ctx.shape[1]
    if t == length:
        return ctx
    if length % t == 0:
        return ctx.repeat(1, length // t, 1)
    return None


class RSAPatch(PatchValue):
    """One RSA patch: APPLY_MODEL wrapper + attn1_patch + attn1 replace (one object serving all three roles)."""

    def __init__(self, reference: ReferenceSet, settings: RSASettings, base_model=None):
        self.reference = reference
        self.settings = settings
        self.uid = uuid.uuid4().hex[:8]
        self.state_key = f"personalize.rsa.{self.uid}"
        self.bank_key = f"personalize.rsa.bank.{self.uid}"
        self.run_key = f"personalize.rsa.run.{self.uid}"
        # output projections per block, for ranking several references by the norm of their projected deltas
        self._to_out = {}
        if base_model is not None:
            for key in transformer_blocks(base_model):
                self._to_out[key] = attention_module(base_model, key, "attn1").to_out[0]
        # caches (host -> device copies made once per device / layout, never per call)
        self._plans: dict = {}
        self._latents: dict = {}
        self._context: dict = {}
        self._uuids = [uuid.uuid5(uuid.NAMESPACE_OID, f"personalize.rsa.{self.uid}.{i}") for i in range(64)]

    def models(self):
        return [] if self.settings.batched else [self.reference.encoder]

    # ---------------------------------------------------------------------------------- OUTER_SAMPLE wrapper
    def outer_sample(self, executor, *args, **kwargs):
        guider = executor.class_obj
        sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
        old = guider.model_options
        to = dict(old.get("transformer_options", {}))
        to[self.run_key] = RunCache(sigmas)
        guider.model_options = {**old, "transformer_options": to}
        try:
            return executor(*args, **kwargs)
        finally:
            guider.model_options = old

    # ------------------------------------------------------------------------------------------ caches
    def _fitted(self, h: int, w: int, device) -> torch.Tensor:
        key = (h, w, str(device))
        if key not in self._latents:
            ref = self.reference
            self._latents[key] = fit_latent(to_device(ref.latents, device, torch.float32), h, w,
                                            to_device(ref.white, device, torch.float32))
        return self._latents[key]

    def _prompt(self, transformer_options: dict, device):
        """(context, y) of the reference prompt on ``device``: the encoder's, else the guider's, else None."""
        ref = self.reference
        if ref.context is not None:
            key = str(device)
            if key not in self._context:
                self._context[key] = to_device(ref.context, device)
            return self._context[key], None
        rp = transformer_options.get(REFERENCE_PROMPT)
        if isinstance(rp, ReferencePrompt):
            return rp.on(device)
        return None

    def _plan(self, key, B, per, chunk_uses, group_of, N, extra_rows, device) -> CallState:
        """Row plan of one call layout, built on the host once and kept on the device."""
        hit = self._plans.get(key)
        if hit is None:
            rows = B + extra_rows
            ref_index = torch.arange(rows).unsqueeze(1).repeat(1, N)
            uses = torch.zeros(rows, dtype=torch.bool)
            for c, u in enumerate(chunk_uses):
                if u:
                    gi = group_of[c]
                    for r in range(c * per, (c + 1) * per):
                        uses[r] = True
                        ref_index[r] = B + gi * N + torch.arange(N)
            idx_ref = torch.nonzero(uses, as_tuple=True)[0]
            idx_plain = torch.nonzero(~uses, as_tuple=True)[0]
            hit = CallState(self.settings, N, to_device(ref_index, device), to_device(uses, device),
                            all_ref=bool(uses.all()), none_ref=not bool(uses.any()),
                            idx_ref=to_device(idx_ref, device), idx_plain=to_device(idx_plain, device))
            self._plans[key] = hit
        return CallState(hit.settings, hit.n_refs, hit.ref_index, hit.uses_ref, hit.all_ref, hit.none_ref, None,
                         hit.idx_ref, hit.idx_plain, hit._scale)

    def _ref_noise(self, run, shape, t, device) -> torch.Tensor:
        """Fresh noise for the reference rows of this call, seeded by the seed and the step's sigma: chosen on the
        device from the run's precomputed bank (nearest schedule sigma); outside a sampling run, drawn for the
        call's sigma (one host read)."""
        ref = self.reference
        if run is not None and run.sigmas:
            sched, bank = run.noise_bank(ref.seed, shape, self.settings, device)
            i = (sched - t[:1].float()).abs().argmin().view(1)
            return bank.index_select(0, i)[0]
        return _noise(shape, ref.seed, float(t.reshape(-1)[0]), device, torch.float32)

    # ----------------------------------------------------------------------------------- APPLY_MODEL wrapper
    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                    **kwargs):
        from . import rows as R

        s = self.settings

        def untouched():
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

        if s.strength == 0.0 or c_crossattn is None:
            return untouched()
        if not s.full_range and not s.active(float(t.reshape(-1)[0])):  # the one host read: only with a range
            return untouched()
        ref = self.reference
        B = x.shape[0]
        chunks = R.chunk_kinds(transformer_options)
        per = R.chunk_size(transformer_options, B)
        if per is None:                       # contract broken upstream: treat the call as one conditional chunk
            chunks, per = [0], B
        gen = len(chunks) - R.reference_chunks(transformer_options)
        # which chunks read the reference: three-branch guidance says so itself; under plain CFG the conditional
        # rows, and with uncond_reference the negative-prompt rows too (so that CFG does not multiply the
        # reference's pull by the guidance scale)
        use_kinds = tuple(transformer_options.get(R.REFERENCE_KINDS, (0, 1) if s.uncond_reference else (0,)))
        chunk_uses = [i < gen and k in use_kinds for i, k in enumerate(chunks)]
        if not any(chunk_uses):
            return untouched()
        dev, dt = x.device, x.dtype
        prompt = self._prompt(transformer_options, dev)
        shared = prompt is not None
        neg = R.uncond_kinds(transformer_options)
        using = [i for i, u in enumerate(chunk_uses) if u]
        if shared:   # one reference set, encoded with the reference prompt, for every chunk that reads it
            groups = [next((i for i in range(gen) if chunks[i] not in neg), using[0])]
            group_of = {c: 0 for c in using}
        else:        # one reference set per chunk, encoded with that chunk's own prompt
            groups = using
            group_of = {c: gi for gi, c in enumerate(using)}
        N = ref.count
        G = len(groups)
        n_ref = G * N
        h, w = x.shape[-2:]
        latents = self._fitted(h, w, dev)
        ms = executor.class_obj.model_sampling
        run = transformer_options.get(self.run_key)

        ctx_len = c_crossattn.shape[1]
        if shared:
            pctx = _fit_tokens(prompt[0].to(c_crossattn.dtype), ctx_len)
            ctxs = [prompt[0].to(c_crossattn.dtype)] if pctx is None else [pctx]
        else:
            pctx = c_crossattn
            ctxs = [c_crossattn[g * per: g * per + 1] for g in groups]
        batched = s.batched and s.features == "per_step" and control is None and pctx is not None
        K = -(-n_ref // per) if batched else 0          # whole chunks of reference rows (padded)
        pad = K * per - n_ref
        key = (B, per, tuple(chunk_uses), tuple(sorted(group_of.items())), N, K * per, str(dev))
        state = self._plan(key, B, per, chunk_uses, group_of, N, K * per, dev)
        to = dict(transformer_options)
        to[self.state_key] = state

        def noisy(sig_host=None):
            lat = latents.repeat(G, 1, 1, 1)
            if sig_host is None:
                n = self._ref_noise(run, tuple(lat.shape), t, dev)
                sig_t = t[:1].float().expand(lat.shape[0])
            else:
                n = _noise(tuple(lat.shape), ref.seed, sig_host, dev, torch.float32)
                sig_t = torch.full((lat.shape[0],), sig_host, device=dev, dtype=torch.float32)
            return ms.noise_scaling(sig_t.view(-1, 1, 1, 1), n, lat).to(dt), sig_t.to(t.dtype)

        def ref_rows(src: torch.Tensor, fixed=None) -> torch.Tensor:
            """Rows of a per-row input for the reference rows: each group's (or the given) row, N times, padded."""
            parts = [(fixed if fixed is not None else src[g * per: g * per + 1]).expand(N, *src.shape[1:])
                     for g in groups]
            out = torch.cat(parts)
            return torch.cat([out, out[-1:].expand(pad, *out.shape[1:])]) if pad else out

        if batched:
            xr, tr = noisy()
            if pad:
                xr = torch.cat([xr, xr[-1:].expand(pad, *xr.shape[1:])])
                tr = torch.cat([tr, tr[-1:].expand(pad)])
            ctx = torch.cat([cx.expand(N, -1, -1) for cx in (ctxs if not shared else ctxs * G)])
            if pad:
                ctx = torch.cat([ctx, ctx[-1:].expand(pad, -1, -1)])
            x2, t2 = torch.cat([x, xr]), torch.cat([t, tr])
            cc2 = torch.cat([c_crossattn, ctx.to(c_crossattn.dtype)])
            cat2 = None if c_concat is None else torch.cat([c_concat, ref_rows(c_concat)])
            kw2 = {}
            for k, v in kwargs.items():
                if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == B:
                    fixed = prompt[1].to(v.dtype) if (k == "y" and shared and prompt[1] is not None
                                                      and prompt[1].shape[1:] == v.shape[1:]) else None
                    v = torch.cat([v, ref_rows(v, fixed)])
                kw2[k] = v
            to = R.with_appended_chunks(to, K, 0, self._uuids[:K] if K <= len(self._uuids) else
                                        [uuid.uuid4() for _ in range(K)])
            out = executor(x2, t2, cat2, cc2, control, to, **kw2)
            return out[:B]

        state.bank = self._bank(executor, transformer_options, groups, ctxs if not shared else ctxs * G, noisy,
                                prompt, kwargs, per, N, (h, w))
        return executor(x, t, c_concat, c_crossattn, control, to, **kwargs)

    def _bank(self, executor, transformer_options, groups, ctxs, noisy, prompt, kwargs, per, N, hw):
        import comfy.patcher_extension as pe

        from . import rows as R

        s = self.settings
        run = transformer_options.get(self.run_key)
        key = None
        if s.features == "once":
            uuids = transformer_options.get("uuids") or []
            key = (hw, tuple(str(uuids[g]) if g < len(uuids) else g for g in groups))
            if run is not None and key in run.banks:
                return run.banks[key]
        xr, tr = noisy(s.once_sigma) if s.features == "once" else noisy()
        ctx = torch.cat([cx.expand(N, -1, -1) for cx in ctxs])
        if s.batched:   # the base model's own weights: its input wrappers (the location channel) apply, no patches
            enc = executor.class_obj
            wr = transformer_options.get("wrappers", {}).get(pe.WrappersMP.DIFFUSION_MODEL)
            enc_to = {"wrappers": {pe.WrappersMP.DIFFUSION_MODEL: wr}} if wr else {}
        else:
            enc = self.reference.encoder.model
            enc_to = dict(self.reference.encoder.model_options.get("transformer_options", {}))
            enc_to = {k: v for k, v in enc_to.items() if k not in ("wrappers", "callbacks")}
        enc_to.update({"cond_or_uncond": [0], "uuids": [self._uuids[0]], R.REFERENCE_CHUNKS: 1})
        enc_to, bank = with_attn1_collector(enc_to, self.bank_key)
        extra = {}
        y = kwargs.get("y")
        if y is not None:
            fixed = prompt[1] if (prompt is not None and prompt[1] is not None) else None
            extra["y"] = torch.cat([(fixed.to(y.dtype) if fixed is not None else y[g * per: g * per + 1])
                                    .expand(N, *y.shape[1:]) for g in groups])
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
            if lin is not None:   # W_o d: the layer (ComfyUI's op, whatever device its weights are on) minus its bias
                bias = lin(torch.zeros_like(deltas[0][:1, :1])) if lin.bias is not None else 0
                norms_from = [lin(d) - bias for d in deltas]
        pooled = pool(o, deltas, s.pooling, norms_from)
        return pooled if s.strength == 1.0 else o + s.strength * (pooled - o)


# ---------------------------------------------------------------------------------------------- three-branch CFG
def three_branch_predict(model, positive, negative, x, timestep, model_options: dict, image_scale: float,
                         text_scale: float, prompt: ReferencePrompt | None):
    """BootPIG's guidance in one batched call (paper Eq. 4, official pipeline):

        eps = eps_u + image_scale (eps_ref - eps_u) + text_scale (eps_ref+text - eps_ref)

    eps_u: negative prompt without the reference; eps_ref: negative prompt with it; eps_ref+text: the prompt with it.
    ``calc_cond_batch`` over ``[positive, negative, negative]`` (indices 0, 1, 2, like Guider_PerpNeg's third
    conditioning): chunks 0 and 2 read the reference, 1 and 2 are negative-prompt rows, and the reference rows are
    encoded once with the reference prompt (``prompt``, or the encoder's own) and serve both reference branches.
    Computed on denoised x0, which is affine in eps. Pre- and post-CFG hooks are replayed as Guider_PerpNeg does."""
    import comfy.samplers

    from . import rows as R

    to = dict(model_options.get("transformer_options", {}))
    to[R.REFERENCE_KINDS] = (0, 2)
    to[R.UNCOND_KINDS] = (1, 2)
    if prompt is not None:
        to[REFERENCE_PROMPT] = prompt
    mo = {**model_options, "transformer_options": to}
    conds = [positive, negative, negative]
    out = comfy.samplers.calc_cond_batch(model, conds, x, timestep, mo)
    for fn in model_options.get("sampler_pre_cfg_function", []):
        out = fn({"conds": conds, "conds_out": out, "cond_scale": text_scale, "timestep": timestep, "input": x,
                  "sigma": timestep, "model": model, "model_options": mo})
    cond_d, uncond_d, ref_d = out[0], out[1], out[2]
    den = uncond_d + image_scale * (ref_d - uncond_d) + text_scale * (cond_d - ref_d)
    for fn in model_options.get("sampler_post_cfg_function", []):
        den = fn({"denoised": den, "cond": positive, "uncond": negative, "cond_scale": text_scale, "model": model,
                  "uncond_denoised": uncond_d, "cond_denoised": cond_d, "sigma": timestep, "model_options": mo,
                  "input": x, "reference_cond": negative, "reference_denoised": ref_d})
    return den


def three_branch_guider_class():
    """``ThreeBranchGuider``: a CFGGuider whose prediction is :func:`three_branch_predict` (defined on first use, so
    importing the pack's engine does not import ComfyUI)."""
    global _GUIDER_CLASS
    if _GUIDER_CLASS is None:
        import comfy.samplers

        class ThreeBranchGuider(comfy.samplers.CFGGuider):
            image_scale = 5.0
            text_scale = 7.5

            def set_conds(self, positive, negative):
                self.inner_set_conds({"positive": positive, "negative": negative})

            def set_scales(self, image_scale: float, text_scale: float):
                self.image_scale, self.text_scale = float(image_scale), float(text_scale)
                self.cfg = self.text_scale

            def predict_noise(self, x, timestep, model_options={}, seed=None):
                positive = self.conds.get("positive", None)
                prompt = getattr(self, "_prompt", None)
                if prompt is None or prompt[0] is not positive:
                    self._prompt = prompt = (positive, ReferencePrompt.from_conds(positive))
                return three_branch_predict(self.inner_model, positive, self.conds.get("negative", None), x,
                                            timestep, model_options, self.image_scale, self.text_scale, prompt[1])

        _GUIDER_CLASS = ThreeBranchGuider
    return _GUIDER_CLASS


_GUIDER_CLASS = None


class ThreeBranchGuidance(PatchValue):
    """The RSA node's ``guidance = three_branch`` (kept for existing workflows): the same formula as
    :func:`three_branch_predict` as a post-CFG function under any KSampler, with one extra batch per step - the
    negative prompt with the reference (index 1 of ``[None, negative]``, so other patches see a negative chunk),
    whose reference rows are encoded with the reference prompt like the positive branch's. BootPIG Three-Branch
    Guider does all three branches in one batch."""

    def __init__(self, patch: RSAPatch, image_scale: float, text_scale: float):
        self.patch, self.image_scale, self.text_scale = patch, image_scale, text_scale
        self._prompts: dict = {}

    def _prompt(self, cond) -> ReferencePrompt | None:
        key = id(cond)
        hit = self._prompts.get(key)
        if hit is None or hit[0] is not cond:
            if len(self._prompts) > 8:
                self._prompts.clear()
            hit = self._prompts[key] = (cond, ReferencePrompt.from_conds(cond))
        return hit[1]

    def __call__(self, args):
        import comfy.samplers

        from . import rows as R

        uncond_d, cond_d, uncond = args["uncond_denoised"], args["cond_denoised"], args["uncond"]
        s = self.patch.settings
        if uncond_d is None or uncond is None or s.strength == 0.0:
            return args["denoised"]
        if not s.full_range and not s.active(float(args["sigma"].reshape(-1)[0])):
            return args["denoised"]
        mo = args["model_options"]
        to = dict(mo.get("transformer_options", {}))
        to[R.REFERENCE_KINDS] = (1,)
        prompt = self._prompt(args.get("cond"))
        if prompt is not None:
            to[REFERENCE_PROMPT] = prompt
        ref_d = comfy.samplers.calc_cond_batch(args["model"], [None, uncond], args["input"], args["sigma"],
                                               {**mo, "transformer_options": to})[1]
        return uncond_d + self.image_scale * (ref_d - uncond_d) + self.text_scale * (cond_d - ref_d)


def find_rsa(model) -> RSAPatch | None:
    for p in model.model_options.get("transformer_options", {}).get("patches", {}).get("attn1_patch", []):
        if isinstance(p, RSAPatch):
            return p
    return None


def has_three_branch_patch(model) -> bool:
    return any(isinstance(f, ThreeBranchGuidance) for f in model.model_options.get("sampler_post_cfg_function", []))


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
