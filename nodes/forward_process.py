"""The diffusion forward process, taken from the model's own ComfyUI ``model_sampling`` (never written by hand).

``model_sampling`` (``comfy/model_sampling.py``) defines, for every model ComfyUI runs, how a clean latent and noise
at a noise level ``sigma`` make the noisy latent (``noise_scaling``), what the network sees (``calculate_input``,
``timestep``) and how its output becomes the clean latent (``calculate_denoised``). Training uses exactly these:

- ``sample_sigmas``: one of the model's discrete training sigmas per row (uniform over its table, the DDPM t ~ U{0..T-1});
- ``noisy``: ``noise_scaling(sigma, noise, x0)`` (x0 + sigma * noise for eps / v models);
- ``target``: the network output that ``calculate_denoised`` turns back into x0 (eps for eps models, v for
  v-prediction models). ``calculate_denoised`` is affine in the output, so the target is read off two evaluations of
  it, whatever the parameterisation;
- the network itself is called through the model's ``apply_model`` path (``calculate_input``, ``timestep``, the
  model's ``extra_conds`` for SDXL's ``y``), see ``training_engine.UNetCall``.

``seeded_noise`` is the one formula for deterministic noise per (seed, sigma) the guidance engines use to bring a
reference latent to a step's noise level.
"""
from __future__ import annotations

import torch


def seeded_noise(shape, seed: int, sigma: float, device, dtype) -> torch.Tensor:
    """Gaussian noise that depends only on (seed, sigma): the same reference gets the same noise at a step."""
    g = torch.Generator().manual_seed((int(seed) * 1000003 + int(round(float(sigma) * 10000))) % (2 ** 63))
    return torch.randn(tuple(shape), generator=g).to(device=device, dtype=dtype)
