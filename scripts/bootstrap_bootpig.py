"""Make a BootPIG bootstrap dataset headless, with the same pipeline as the BootPIG Bootstrap Dataset node.

    python -m scripts.bootstrap_bootpig --checkpoint sd21.safetensors --mask-source sam:sam_vit_b.pth --count 5000
    python -m scripts.bootstrap_bootpig --toy --mask-source toy --count 2000 --dataset toyworld_bootstrap

Targets are sampled by the model through ComfyUI's own sampling, segmented by the mask source (SAM: a checkpoint in
models/sams or a path; toy: the toy world's segmenter), set aside when the mask touches the border; the references
are the foregrounds on white. The dataset goes to ComfyUI's output/bootpig_datasets/<dataset> (or --dataset DIR,
an absolute folder). Rerunning the same command continues it; a larger --count extends it.
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


def parse_args(argv=None):
    from personalize.nodes.bootpig_data import BootstrapSettings  # after host.bootstrap()

    d = BootstrapSettings()
    p = argparse.ArgumentParser(prog="python -m scripts.bootstrap_bootpig", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint file, or a name in ComfyUI's models/checkpoints")
    src.add_argument("--toy", action="store_true", help="the toy world's model")
    src.add_argument("--random-tiny", type=int, metavar="SEED", help="seeded random tiny SD1.5 models (smoke runs)")
    p.add_argument("--mask-source", required=True, metavar="sam:FILE | toy",
                   help="sam:FILE (a SAM checkpoint in models/sams, or a path) or toy (the toy world's segmenter)")
    p.add_argument("--dataset", default="bootpig_dataset", help="a name in output/bootpig_datasets, or a folder")
    p.add_argument("--captions", default=None,
                   help="a text file of captions or of objects:/positions:/scenes: sections (default: the built-in "
                        "grammar; the toy world's with --toy)")
    p.add_argument("--overwrite", action="store_true", help="start afresh when the folder has another recipe")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    for name in ("count", "seed", "steps", "cfg", "sampler_name", "scheduler", "width", "height", "batch_size",
                 "negative", "border"):
        default = getattr(d, name)
        if name in ("width", "height"):
            default = None
        p.add_argument("--" + name.replace("_", "-"), type=type(getattr(d, name)), default=default,
                       help=f"default: {default if default is not None else 'the model native size'}")
    return p.parse_args(argv)


def mask_source(spec: str):
    from personalize.nodes import mask_sources
    from personalize.nodes.errors import InputError

    if spec == "toy":
        from personalize.toyworld import segmenter

        return segmenter.mask_source()
    if spec.startswith("sam:"):
        from personalize.nodes import paths, sam

        name = spec[4:]
        path = name if os.path.isfile(name) else paths.full_path("sams", name)
        return mask_sources.SAMMaskSource(sam.load(path, "--mask-source"))
    raise InputError("--mask-source", "sam:FILE or toy", repr(spec))


def main(argv=None) -> int:
    host.select_gpu()
    argv = sys.argv[1:] if argv is None else list(argv)
    host.bootstrap(cpu=True if "--cpu" in argv else None)
    a = parse_args(argv)
    from personalize.nodes import bootpig_data, introspect
    from personalize.nodes.errors import InputError

    try:
        if a.captions:
            with open(a.captions, encoding="utf-8") as fh:
                grammar = bootpig_data.CaptionGrammar.from_text(fh.read(), "--captions")
        elif a.toy:
            from personalize.toyworld.captions import ToyCaptions

            grammar = ToyCaptions()
        else:
            grammar = bootpig_data.CaptionGrammar.general()
        source = mask_source(a.mask_source)
        if a.toy:
            from personalize.toyworld import model as toy

            model, clip, vae = toy.load()[:3]
            native = toy.shipped_image_size()
        else:
            model, clip, vae = host.load_models(a.checkpoint, a.random_tiny)
            native = 64 if a.random_tiny is not None else introspect.NATIVE_RESOLUTION[introspect.family(model)]
        s = bootpig_data.BootstrapSettings(
            count=a.count, seed=a.seed, steps=a.steps, cfg=a.cfg, sampler_name=a.sampler_name, scheduler=a.scheduler,
            width=a.width or native, height=a.height or native, batch_size=a.batch_size, negative=a.negative,
            border=a.border)
        folder = a.dataset if os.path.isabs(a.dataset) else bootpig_data.dataset_dir(a.dataset, "--dataset")
        t0 = time.time()

        class Progress:
            def update_absolute(self, value, total=None, preview=None):
                if value % max(1, s.count // 20) == 0 or value == s.count:
                    print(f"[bootstrap] {value}/{s.count}  {time.time() - t0:.1f}s", file=sys.stderr, flush=True)

        r = bootpig_data.bootstrap(model, clip, vae, source, folder, s, grammar, overwrite=a.overwrite,
                                   check_interrupt=lambda: None, progress=Progress())
        print(f"[bootstrap] kept {r.kept}, set aside {r.discarded} (sampled {r.generated} now), "
              f"{time.time() - t0:.1f}s", file=sys.stderr)
        print(r.path)
        return 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
