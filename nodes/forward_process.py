"""The diffusion forward process, taken from the model's own ComfyUI ``model_sampling`` (never written by hand).

``model_sampling`` (``comfy/model_sampling.py``) defines, for every model ComfyUI runs, how a clean latent and noise
at a noise level ``sigma`` make the noisy latent (``noise_scaling``), what the network sees (``calculate_input``,
``timestep``) and how its output becomes the clean latent (``calculate_denoised``). Training uses exactly these:

- ``training_sigmas`` / ``sample_timesteps``: one of the model's discrete training sigmas per row (uniform over
  its table: the DDPM t ~ U{0..T-1});
- ``noisy``: ``noise_scaling(sigma, noise, x0)`` (x0 + sigma * noise for eps / v models);
- ``target``: the network output that ``calculate_denoised`` turns back into x0 (eps for eps models, v for
  v-prediction models). ``calculate_denoised`` is affine in the output, so the target is read off two evaluations of
  it, whatever the parameterisation;
- the network itself is called through the model's ``apply_model`` path (``calculate_input``, ``timestep``, the
  model's ``extra_conds`` for SDXL's ``y``), see ``training_engine.UNetCall``.

- ``loss_weight``: per-row weights of the MSE on that target by noise level (none; Min-SNR-gamma, Hang et al. 2023;
  kohya's debiased estimation, Yu et al. 2024), from the SNR of ``noise_scaling``; ``min_snr_weight`` is the one
  Min-SNR formula (also the toy world's base-model training uses it).

``seeded_noise`` is the one formula for deterministic noise per (seed, sigma) the guidance engines use to bring a
reference latent to a step's noise level.
"""
from __future__ import annotations

import torch


def seeded_noise(shape, seed: int, sigma: float, device, dtype) -> torch.Tensor:
    """Gaussian noise that depends only on (seed, sigma): the same reference gets the same noise at a step."""
    g = torch.Generator().manual_seed((int(seed) * 1000003 + int(round(float(sigma) * 10000))) % (2 ** 63))
    from .attention import to_device  # drawn on the host (the same numbers on every device), copied without blocking

    return to_device(torch.randn(tuple(shape), generator=g), device, dtype)


def _col(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.reshape((-1,) + (1,) * (like.ndim - 1)).to(device=like.device, dtype=like.dtype)


def coefficients(model_sampling, sigma: torch.Tensor, like: torch.Tensor) -> dict:
    """Per-row coefficients of ComfyUI's (affine) maps, read off the model_sampling itself:
    ``noise_scaling``: x = n_x0 * x0 + n_eps * noise + n_0;
    ``calculate_denoised``: x0 = c_skip * x + c_out * out + c_0."""
    s = _col(sigma, like)
    zero, one = torch.zeros_like(s), torch.ones_like(s)
    sig = sigma.reshape(-1).to(device=like.device, dtype=like.dtype)

    def ns(noise, x0):
        return model_sampling.noise_scaling(sig, noise.clone(), x0.clone())

    def cd(out, x):
        return model_sampling.calculate_denoised(sig, out.clone(), x.clone())

    n_0, c_0 = ns(zero, zero), cd(zero, zero)
    return {"n_x0": ns(zero, one) - n_0, "n_eps": ns(one, zero) - n_0, "n_0": n_0,
            "c_skip": cd(zero, one) - c_0, "c_out": cd(one, zero) - c_0, "c_0": c_0}


def noisy(model_sampling, sigma: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The noisy latent at ``sigma``: ComfyUI's ``noise_scaling`` (what its samplers do to start from a latent)."""
    sig = sigma.reshape(-1).to(device=x0.device, dtype=x0.dtype)
    return model_sampling.noise_scaling(sig, noise.clone(), x0.clone())


def target(model_sampling, sigma: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The network output ``out`` with ``calculate_denoised(sigma, out, noisy(sigma, x0, noise)) == x0``: eps for
    eps-prediction models, v for v-prediction ones. Expanded in (x0, noise) so that an eps target is the noise itself
    up to one rounding, not a difference of nearly equal latents."""
    c = coefficients(model_sampling, sigma, x0)
    a = 1.0 - c["c_skip"] * c["n_x0"]
    return (a * x0 - c["c_skip"] * c["n_eps"] * noise - c["c_skip"] * c["n_0"] - c["c_0"]) / c["c_out"]


def output_from_denoised(model_sampling, sigma: torch.Tensor, denoised: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The network output behind ComfyUI's denoised value (``calculate_denoised`` inverted)."""
    c = coefficients(model_sampling, sigma, denoised)
    return (denoised - c["c_skip"] * x - c["c_0"]) / c["c_out"]


def training_sigmas(model_sampling) -> torch.Tensor:
    """The model's discrete training noise levels (DDPM t = 0..T-1 as sigmas), float32 on the CPU (a normal tensor,
    also when called under inference mode)."""
    with torch.inference_mode(False):
        return model_sampling.sigmas.detach().float().cpu().clone()


def sample_timesteps(sigmas: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """t ~ U{0..T-1} per row (the DDPM training distribution) over ``training_sigmas``' table, from a seeded
    generator: every trainer's noise-level draw."""
    return torch.randint(0, int(sigmas.shape[0]), (n,), generator=generator)


# per-row loss weightings of the MSE on the model's own target (eps or v), by the row's signal-to-noise ratio:
# - "none": every noise level alike (DDPM, diffusers' and kohya's default);
# - "min_snr_5": Min-SNR-gamma with gamma 5 (Hang et al. 2023): min(SNR, 5) / SNR for eps, min(SNR, 5) / (SNR + 1)
#   for v; the low-noise levels stop dominating;
# - "debiased": kohya's --debiased_estimation_loss (Yu et al. 2024): 1 / sqrt(SNR) for eps, 1 / (SNR + 1) for v, SNR
#   clipped at 1000; the high-noise levels, where an image's layout and colours are decided, weigh more.
LOSS_WEIGHTINGS = ("none", "min_snr_5", "debiased")


def snr(model_sampling, sigma: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio (n_x0 / n_eps)^2 of ``noise_scaling`` at each sigma (1 / sigma^2 for eps and v models)."""
    c = coefficients(model_sampling, sigma.reshape(-1), sigma.reshape(-1))
    return (c["n_x0"] / c["n_eps"]) ** 2


def min_snr_weight(snr: torch.Tensor, gamma: float = 5.0, v_prediction: bool = False,
                   high_noise_cap: float = 0.0) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023) per row from its SNR: min(SNR, gamma) / SNR for an eps target, / (SNR + 1) for
    a v target. ``high_noise_cap`` > 0 multiplies it by min(1 + 1 / SNR, cap): the eps loss weighted toward the v /
    x0 loss at high noise (where layout and colours are decided), truncated at the cap."""
    w = torch.clamp(snr, max=gamma) / (snr + 1 if v_prediction else snr)
    if high_noise_cap > 0:
        w = w * torch.clamp(1 + 1 / snr, max=high_noise_cap)
    return w


def loss_weight(model_sampling, sigma: torch.Tensor, kind: str = "none") -> torch.Tensor:
    """Per-row weight [B] of the MSE on ``target`` under the weighting ``kind`` (LOSS_WEIGHTINGS). The model's target
    decides the formula: eps when ``calculate_denoised`` is x - sigma * out (c_skip 1), v otherwise."""
    sig = sigma.reshape(-1)
    if kind == "none":
        return torch.ones_like(sig)
    if kind not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss weighting: one of {LOSS_WEIGHTINGS} expected, got {kind!r}")
    c = coefficients(model_sampling, sig, sig)
    r = (c["n_x0"] / c["n_eps"]) ** 2   # snr(), from the coefficients already at hand
    eps = bool(torch.allclose(c["c_skip"], torch.ones_like(c["c_skip"])))
    if kind == "min_snr_5":
        return min_snr_weight(r, 5.0, v_prediction=not eps)
    r = torch.clamp(r, max=1000.0)
    return 1 / r.sqrt() if eps else 1 / (r + 1)
