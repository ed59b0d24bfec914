"""The training engine's shared parts: the forward process taken from ComfyUI's model_sampling (float64 against the
sampling side), frozen copies that share the model's storage, the LR schedule."""
from __future__ import annotations

import pytest
import torch

from personalize.nodes import forward_process as fp
from personalize.nodes import training_engine as engine
from personalize.nodes.frozen_weights import frozen_copy, shares_storage
from scripts import models


def float64_model(family: str, prediction: str):
    """A tiny real BaseModel (eps or v-prediction) in float64: UNet weights, dtype and model_sampling."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher

    mc = models.model_config(family, tiny=True)
    kind = comfy.model_base.ModelType.V_PREDICTION if prediction == "v" else comfy.model_base.ModelType.EPS
    mc.model_type = lambda *a, **k: kind
    bm = mc.get_model({})
    models.init_random_(bm.diffusion_model, 0)
    bm.diffusion_model.to(torch.float64)
    bm.diffusion_model.dtype = torch.float64
    bm.model_sampling.to(torch.float64)
    return comfy.model_patcher.ModelPatcher(bm, load_device=torch.device("cpu"), offload_device=mm.unet_offload_device())


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_forward_process_matches_comfyui_sampling_side_in_float64(family, prediction):
    import comfy.model_sampling as msm
    import comfy.sampler_helpers
    import comfy.samplers

    patcher = float64_model(family, prediction)
    bm = patcher.model
    ms = bm.model_sampling
    assert isinstance(ms, msm.V_PREDICTION) == (prediction == "v")
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    sigma = fp.training_sigmas(ms).double()[torch.tensor([30, 870])]
    cond = models.random_conditioning(family, seed=2)
    cond = [[cond[0][0].double(), {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in
                                   cond[0][1].items()}]]

    # the target: what ComfyUI's calculate_denoised turns back into x0 (eps = the noise; v = the v of the paper)
    x = fp.noisy(ms, sigma, x0, noise)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(x, x0 + s * noise, rtol=0, atol=1e-12)
    target = fp.target(ms, sigma, x0, noise)
    torch.testing.assert_close(ms.calculate_denoised(sigma, target, x), x0, rtol=0, atol=1e-11)
    ab = 1 / (1 + s * s)
    want = noise if prediction == "eps" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
    torch.testing.assert_close(target, want, rtol=0, atol=1e-11)

    # the network call: the sampler's conditioning (extra_conds via encode_model_conds, SDXL's y included) and
    # calc_cond_batch against the engine's UNetCall on the same UNet
    conds = comfy.samplers.encode_model_conds(bm.extra_conds, comfy.sampler_helpers.convert_cond(cond), x,
                                              torch.device("cpu"), "positive")
    bm.current_patcher = patcher
    with torch.no_grad():
        denoised = comfy.samplers.calc_cond_batch(bm, [conds], x, sigma, {})[0]
        call = engine.UNetCall(bm, bm.diffusion_model)
        out = call(x, sigma, [(cond[0][0], cond[0][1])], [2])
    if family == "sdxl":
        y = call.conditioning([(cond[0][0], cond[0][1])], [2])["y"]
        assert y.shape == (2, 2816) and y.dtype == torch.float64
    torch.testing.assert_close(ms.calculate_denoised(sigma, out, x), denoised, rtol=0, atol=1e-10)
    assert float((denoised - x).abs().max()) > 1e-3  # the UNet did something


def test_frozen_copy_aliases_frozen_weights_and_clones_only_trainables():
    with torch.inference_mode():  # as ComfyUI loads checkpoints: inference tensors
        net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    flags = [p.requires_grad for p in net.parameters()]
    cp, train = frozen_copy(net, ["1.weight"])
    assert set(train) == {"1.weight"} and train["1.weight"].requires_grad
    assert not shares_storage(cp[1].weight, net[1].weight)
    for a, b in ((cp[0].weight, net[0].weight), (cp[0].bias, net[0].bias), (cp[1].bias, net[1].bias)):
        assert shares_storage(a, b) and not a.requires_grad and not a.is_inference()
    x = torch.randn(3, 4, requires_grad=True)
    cp(x).sum().backward()  # gradients flow through the aliased inference weights
    assert x.grad is not None and train["1.weight"].grad is not None
    assert cp[0] is not net[0] and [p.requires_grad for p in net.parameters()] == flags


def test_warmup_and_schedule_come_from_lr_scheduler():
    f = engine.lr_factor(engine.EngineConfig(steps=10, warmup_steps=4, schedule="linear"))
    assert [round(f(k), 4) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, round(1 - 1 / 6, 4)]
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_loss_weights_match_their_formulas_in_float64(prediction):
    """forward_process.loss_weight against the published formulas, with the SNR computed from SD1.5's own schedule
    (scaled-linear betas 0.00085..0.012, 1000 steps) in float64, independent of ComfyUI's tables."""
    ms = float64_model("sd15", prediction).model.model_sampling
    t = torch.tensor([0, 1, 20, 150, 500, 999])
    sigma = fp.training_sigmas(ms).double()[t]
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    acp = torch.cumprod(1 - betas, 0)[t]
    snr = acp / (1 - acp)
    torch.testing.assert_close(fp.snr(ms, sigma), snr, rtol=1e-5, atol=0)
    if prediction == "eps":
        want = {"min_snr_5": snr.clamp(max=5) / snr, "debiased": snr.clamp(max=1000) ** -0.5}
    else:
        want = {"min_snr_5": snr.clamp(max=5) / (snr + 1), "debiased": 1 / (snr.clamp(max=1000) + 1)}
    want["none"] = torch.ones_like(snr)
    assert set(want) == set(fp.LOSS_WEIGHTINGS)
    for kind, w in want.items():
        torch.testing.assert_close(fp.loss_weight(ms, sigma, kind), w, rtol=1e-5, atol=0)
    # debiased weighs the noisiest level far above the cleanest one; Min-SNR never above 1
    assert fp.loss_weight(ms, sigma, "debiased")[-1] > 100 * fp.loss_weight(ms, sigma, "debiased")[0]
    assert float(fp.loss_weight(ms, sigma, "min_snr_5").max()) <= 1.0 + 1e-12
    with pytest.raises(ValueError, match="loss weighting"):
        fp.loss_weight(ms, sigma, "snr")
