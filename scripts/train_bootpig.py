"""Train BootPIG headless on a bootstrap dataset, with the same loop as the BootPIG Trainer node.

    python -m scripts.train_bootpig --checkpoint sd15.safetensors --dataset output/bootpig_datasets/mine
    python -m scripts.train_bootpig --toy --dataset DIR --save-name toyworld_bootpig --output-dir weights/toyworld
    torchrun --nproc_per_node=2 -m scripts.train_bootpig --checkpoint ... --dataset ...   (DDP: nccl / gloo)

Under torchrun each process trains on its slice of the global batch (--batch-size per process); rank 0 writes the
checkpoints and the final BootPIG weights (default: ComfyUI's models/bootpig). Rerunning with the same save name
resumes from the last checkpoint (--no-resume starts over).
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

FIELDS = ("steps", "batch_size", "grad_accumulation", "reference_unet_lr", "rsa_lr", "ref_scale",
          "reference_dropout", "caption_dropout", "warmup_steps", "weight_decay", "max_grad_norm", "resolution",
          "seed", "training_dtype", "checkpoint_every", "save_dtype")


def parse_args(argv=None):
    from dataclasses import fields

    from personalize.nodes.bootpig_training import BootPIGConfig  # after host.bootstrap()

    p = argparse.ArgumentParser(prog="python -m scripts.train_bootpig", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint file, or a name in ComfyUI's models/checkpoints")
    src.add_argument("--toy", action="store_true", help="the toy world's model (weights/toyworld)")
    src.add_argument("--random-tiny", type=int, metavar="SEED",
                     help="for tests and smoke runs: seeded random tiny SD1.5 models; the results are noise")
    p.add_argument("--dataset", required=True, help="dataset folder, or a name in output/bootpig_datasets")
    p.add_argument("--save-name", default="bootpig_trained", help="file name (no extension) in --output-dir")
    p.add_argument("--output-dir", default=None, help="where the weights go (default: ComfyUI's models/bootpig)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file of that name")
    p.add_argument("--no-resume", action="store_true", help="ignore a .resume checkpoint of that name")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when CUDA is available")
    p.add_argument("--train", choices=["both", "rsa", "reference_unet"], default="both",
                   help="what trains: both (paper), or one part (the paper's ablation)")
    p.add_argument("--no-augment", action="store_true", help="references without the augmentations")
    defaults = {f.name: f.default for f in fields(BootPIGConfig)}
    for name in FIELDS:
        d = defaults[name]
        p.add_argument("--" + name.replace("_", "-"), type=type(d), default=d, help=f"default: {d}")
    return p.parse_args(argv)


def load_models(a):
    if a.toy:
        from personalize.toyworld import model as toy

        return toy.load()[:3]
    return host.load_models(a.checkpoint, a.random_tiny)


def main(argv=None) -> int:
    host.select_gpu()
    argv = sys.argv[1:] if argv is None else list(argv)
    host.bootstrap(cpu=True if "--cpu" in argv else None)
    a = parse_args(argv)

    from personalize.nodes import bootpig_data, bootpig_training, training_engine
    from personalize.nodes.errors import InputError

    rank = host.init_distributed(a.cpu)
    try:
        import folder_paths

        out_dir = a.output_dir or folder_paths.get_folder_paths("bootpig")[0]
        cfg = bootpig_training.BootPIGConfig(train_reference_unet=a.train != "rsa",
                                             train_rsa=a.train != "reference_unet", augment=not a.no_augment,
                                             **{k: getattr(a, k) for k in FIELDS})
        bootpig_training.validate_config(cfg)
        folder = a.dataset if os.path.isdir(a.dataset) else bootpig_data.dataset_dir(a.dataset, "--dataset")
        path = training_engine.save_path_for(out_dir, a.save_name, a.overwrite)
        model, clip, vae = load_models(a)
        t0 = time.time()
        every = max(1, cfg.steps // 20)

        def on_step(step, total, loss):
            if rank == 0 and (step % every == 0 or step == total):
                print(f"[bootpig] step {step}/{total}  loss {loss:.4f}  {time.time() - t0:.1f}s", file=sys.stderr,
                      flush=True)

        res = bootpig_training.train(model, clip, vae, os.path.abspath(folder), cfg, path, overwrite=a.overwrite,
                                     resume=not a.no_resume, on_step=on_step, progress=False)
        if rank == 0:
            if res.resumed_from:
                print(f"[bootpig] resumed from step {res.resumed_from}", file=sys.stderr)
            print(f"[bootpig] {res.items} triplets, {cfg.steps} steps, {time.time() - t0:.1f}s", file=sys.stderr)
            print(res.path)
        return 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        host.end_distributed()


if __name__ == "__main__":
    sys.exit(main())
