"""What every sampling benchmark shares: the common arguments, the device banner, the resolution per family, and
timing one sampling call (median after a warm-up, peak GPU memory)."""
from __future__ import annotations

import argparse
import statistics
import time


def add_sampling_args(p: argparse.ArgumentParser, families: str = "sd15,sdxl") -> argparse.ArgumentParser:
    p.add_argument("--families", default=families)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny models (smoke test), small latents")
    p.add_argument("--cpu", action="store_true")
    return p


def device(a, what: str) -> bool:
    """Boot the host on the requested device, print the banner line; True when on CUDA."""
    from scripts import host

    host.bootstrap(cpu=a.cpu)
    import torch

    import comfy.model_management as mm

    dev = mm.get_torch_device()
    cuda = dev.type == "cuda"
    print(f"device: {torch.cuda.get_device_name(dev) if cuda else 'cpu'}; torch {torch.__version__}; steps {a.steps}; "
          f"{what}{'; ' if what else ''}{'tiny' if a.tiny else 'full-size'} random weights")
    return cuda


def resolution(family: str, tiny: bool) -> int:
    return (64 if family == "sd15" else 128) if tiny else (512 if family == "sd15" else 1024)


def timed(run, repeats: int, cuda: bool) -> tuple[float, float]:
    """(median seconds of ``run()`` over ``repeats`` calls after one warm-up call, peak GPU GiB or nan)."""
    import torch

    run()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")
    return statistics.median(times), peak


def time_sampling(model, a, cuda: bool, positive, negative, latent_hw: tuple[int, int], cfg: float = 5.0):
    """``timed`` for one stock KSampler run (euler / normal, ``a.steps`` steps, seed 1) of ``model``."""
    import torch

    import nodes

    def run():
        with torch.inference_mode():
            nodes.common_ksampler(model, 1, a.steps, cfg, "euler", "normal", positive, negative,
                                  {"samples": torch.zeros(1, 4, *latent_hw)})

    return timed(run, a.repeats, cuda)
