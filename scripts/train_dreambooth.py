"""Train a DreamBooth LoRA headless, with the same loop as the DreamBooth LoRA Trainer node.

    python -m scripts.train_dreambooth --checkpoint sd15.safetensors --images photos/ --class-noun dog
    torchrun --nproc_per_node=2 -m scripts.train_dreambooth --checkpoint ... --images ...   (DDP: nccl / gloo)

Under torchrun each process trains on its slice of the global batch (--batch-size per process); rank 0 samples
the class images (cached), writes checkpoints and the final kohya-format LoRA (default: ComfyUI's models/loras).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "scripts"

from . import host

# TrainConfig fields that are command-line options (--num-class-images ...), with TrainConfig's defaults
CONFIG_OPTIONS = ("num_class_images", "prior_loss_weight", "rank", "alpha", "learning_rate", "text_encoder_lr", "steps",
                  "batch_size", "resolution", "seed", "checkpoint_every", "class_steps", "class_cfg", "class_sampler",
                  "class_scheduler", "class_batch", "training_dtype", "targets", "grad_accumulation", "loss_weighting")


def parse_args(argv=None):
    from dataclasses import fields

    p = argparse.ArgumentParser(prog="python -m scripts.train_dreambooth", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint file, or a name in ComfyUI's models/checkpoints")
    src.add_argument("--random-tiny", type=int, metavar="SEED",
                     help="for tests and smoke runs: seeded random tiny SD1.5 models (UNet, CLIP, TAESD VAE) "
                          "instead of a checkpoint; the results are noise")
    p.add_argument("--images", required=True, help="folder with the 3-5 instance photos")
    p.add_argument("--class-noun", default="dog", help="fills {class} in the prompts (default: dog)")
    p.add_argument("--instance-prompt", default="a photo of sks {class}")
    p.add_argument("--class-prompt", default="a photo of {class}")
    p.add_argument("--save-name", default="dreambooth_sks_dog", help="file name (no extension) in --output-dir")
    p.add_argument("--output-dir", default=None, help="where the LoRA goes (default: ComfyUI's models/loras)")
    p.add_argument("--class-cache", default=None,
                   help="class-image cache folder (default: ComfyUI's output/personalize_class_images)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file of that name")
    p.add_argument("--no-resume", action="store_true", help="ignore a .resume checkpoint of that name")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when CUDA is available")
    defaults = {f.name: f.default for f in fields(_config_class())}
    for name in CONFIG_OPTIONS:
        d = defaults[name]
        p.add_argument("--" + name.replace("_", "-"), type=type(d), default=d, help=f"default: {d}")
    p.add_argument("--train-text-encoder", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    return p.parse_args(argv)


def _config_class():
    from personalize.nodes.dreambooth import TrainConfig  # after host.bootstrap()

    return TrainConfig


def main(argv=None) -> int:
    host.select_gpu()
    argv = sys.argv[1:] if argv is None else list(argv)
    host.bootstrap(cpu=True if "--cpu" in argv else None)
    a = parse_args(argv)

    from personalize.nodes import dreambooth
    from personalize.nodes.errors import InputError

    rank = host.init_distributed(a.cpu)
    try:
        import folder_paths

        out_dir = a.output_dir or folder_paths.get_folder_paths("loras")[0]
        cache = a.class_cache or os.path.join(folder_paths.get_output_directory(), "personalize_class_images")
        cfg = dreambooth.TrainConfig(
            instance_prompt=dreambooth.fill_class(a.instance_prompt, a.class_noun),
            class_prompt=dreambooth.fill_class(a.class_prompt, a.class_noun),
            train_text_encoder=a.train_text_encoder, gradient_checkpointing=a.gradient_checkpointing,
            **{k: getattr(a, k) for k in CONFIG_OPTIONS})
        dreambooth.validate_config(cfg)
        path = dreambooth.save_path_for(out_dir, a.save_name, a.overwrite)
        images = dreambooth.load_image_dir(a.images, "--images")
        model, clip, vae = host.load_models(a.checkpoint, a.random_tiny)
        t0 = time.time()
        every = max(1, cfg.steps // 20)

        def on_step(step, total, inst, prior):
            if rank == 0 and (step % every == 0 or step == total):
                extra = "" if prior is None else f"  prior {prior:.4f}"
                print(f"[dreambooth] step {step}/{total}  instance {inst:.4f}{extra}  {time.time() - t0:.1f}s",
                      file=sys.stderr, flush=True)

        res = dreambooth.train(model, clip, vae, images, cfg, path, cache, overwrite=a.overwrite,
                             resume=not a.no_resume, on_step=on_step)
        if rank == 0:
            if res.resumed_from:
                print(f"[dreambooth] resumed from step {res.resumed_from}", file=sys.stderr)
            print(res.path)
        return 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        host.end_distributed()


if __name__ == "__main__":
    sys.exit(main())
