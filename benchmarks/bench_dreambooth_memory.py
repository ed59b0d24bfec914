"""Peak host memory and step time of DreamBooth-LoRA training steps on the CPU, full-size SD1.5, as in the graph.

    python -m benchmarks.bench_dreambooth_memory            # the generated checkpoint, 256 px, 3 steps, fp32
    python -m benchmarks.bench_dreambooth_memory --resolution 512 --steps 5

The checkpoint (``.cache/checkpoints/personalize-random-sd15.safetensors``, random weights in the real layout, made by
``python -m scripts.make_checkpoint``) is loaded with ComfyUI's own loader under ``torch.inference_mode()``, as the
executor does, so its weights are inference tensors (the case in which a trainer must not copy the UNet). Then
``train`` runs with rank 4, batch 1 + 1 class image (1 class image, sampled with 1 step), no checkpoints. A thread
samples the process's resident memory (VmRSS) every 5 ms; printed: RSS after loading, peak RSS during training, the
difference (what training adds), and ms per step (steps after the first).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

from scripts import host  # noqa: E402


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


class PeakRSS(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = rss_gib(), False

    def run(self):
        while not self.stop:
            self.peak = max(self.peak, rss_gib())
            time.sleep(0.005)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)
    host.bootstrap(cpu=True)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import comfy.sd
    from scripts.make_checkpoint import ensure_checkpoint

    try:
        from personalize.nodes import dreambooth as db
    except ImportError:  # the code before the rename (for the "before" row)
        from personalize.nodes import training as db
    path = ensure_checkpoint()
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, a.resolution, a.resolution, 3, generator=g)
    cfg = db.TrainConfig(steps=a.steps, resolution=a.resolution, num_class_images=1, class_steps=1, rank=4, alpha=4.0,
                         learning_rate=1e-4, batch_size=1, training_dtype="fp32", checkpoint_every=0)
    stamps = {}

    def on_step(step, *_):
        stamps[step] = time.perf_counter()

    import gc

    gc.collect()
    base = rss_gib()
    mon = PeakRSS()
    mon.start()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        db.train(model, clip, vae, list(pixels), cfg, f"{tmp}/bench.safetensors", None, overwrite=True, on_step=on_step)
    total = time.perf_counter() - t0
    mon.stop = True
    mon.join()
    steps = sorted(stamps)
    ms = 1000 * (stamps[steps[-1]] - stamps[steps[0]]) / max(1, len(steps) - 1)
    print(f"code: {db.__name__}; torch {torch.__version__}; threads {torch.get_num_threads()}; SD1.5 full-size, "
          f"{a.resolution} px, rank 4, batch 1 + 1 class image, fp32, {a.steps} steps")
    print(f"RSS after load {base:.2f} GiB; peak during train {mon.peak:.2f} GiB; training adds "
          f"{mon.peak - base:.2f} GiB; {ms:.0f} ms/step (steps 2..{a.steps}); train() total {total:.1f} s")


if __name__ == "__main__":
    main()
