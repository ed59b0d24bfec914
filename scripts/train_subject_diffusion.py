"""Train Subject-Diffusion's new parts (conv_in, attn2 k/v, gated adapters, grounding and image-prompt MLPs) headless.

    python -m scripts.train_subject_diffusion --checkpoint CKPT.safetensors --clip-vision CLIP_VISION.safetensors \\
        --data DATA_DIR --steps 2000 --name my_subjects

DATA_DIR holds the images and ``subjects.json``::

    [{"image": "0001.jpg", "caption": "a dog and a cat on a sofa",
      "subjects": [{"label": "dog", "mask": "0001_dog.png"}, {"label": "cat", "box": [300, 100, 200, 300]}]}, ...]

One or two subjects per image (the paper's limit); a subject is a mask image (white = subject) or a box
``[x, y, w, h]`` in pixels. Images are resized to ``--resolution`` (square, default 512) together with their masks.
The weights are written atomically to ``models/subject_diffusion/NAME.safetensors`` of the ComfyUI tree (or
``--out PATH``) and load with the Subject-Diffusion Weights Loader node.

``--random-tiny`` trains on tiny random models and synthetic data (no files needed): a smoke test of the loop.

The loop is the pack's training engine (as the Subject-Diffusion Trainer node): resume checkpoints
(``NAME.resume`` next to the weights, every ``--checkpoint-every`` steps and on Ctrl-C; a rerun continues),
mixed precision on CUDA, and DDP under torchrun (each process trains on its part of the global batch of
``--batch-size`` x processes examples; rank 0 writes the files)::

    torchrun --nproc_per_node=2 -m scripts.train_subject_diffusion --checkpoint ... --batch-size 1
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "scripts"

from . import host


def load_data(data_dir: Path, resolution: int):
    import numpy as np
    import torch
    from PIL import Image

    from personalize.nodes.subject_training import Example

    spec_path = data_dir / "subjects.json"
    if not spec_path.is_file():
        raise SystemExit(f"error: {spec_path} not found (see --help for its format)")
    spec = json.loads(spec_path.read_text())
    examples = []
    for n, item in enumerate(spec):
        img = Image.open(data_dir / item["image"]).convert("RGB")
        w0, h0 = img.size
        img = img.resize((resolution, resolution), Image.BICUBIC)
        image = torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0)
        masks, labels = [], []
        subjects = item.get("subjects") or []
        if not 1 <= len(subjects) <= 2:
            raise SystemExit(f"error: {item['image']}: 1 or 2 subjects per image, got {len(subjects)}")
        for s in subjects:
            if "mask" in s:
                m = Image.open(data_dir / s["mask"]).convert("L").resize((resolution, resolution), Image.NEAREST)
                mask = torch.from_numpy((np.asarray(m) > 127).astype(np.float32))
            elif "box" in s:
                x, y, bw, bh = s["box"]
                sx, sy = resolution / w0, resolution / h0
                mask = torch.zeros(resolution, resolution)
                mask[int(y * sy):int((y + bh) * sy), int(x * sx):int((x + bw) * sx)] = 1.0
            else:
                raise SystemExit(f"error: {item['image']}: each subject needs a 'mask' or a 'box'")
            masks.append(mask)
            labels.append(s["label"])
        examples.append(Example(image, torch.stack(masks), item.get("caption", ""), labels))
    if not examples:
        raise SystemExit(f"error: {spec_path} lists no images")
    return examples


def tiny_setup(tmp: Path):
    import torch

    import comfy.clip_vision
    from scripts import models
    from personalize.nodes.location import expand_model
    from personalize.nodes.subject_training import Example

    cfg = {"hidden_size": 32, "image_size": 224, "intermediate_size": 64, "layer_norm_eps": 1e-5,
           "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": 2,
           "patch_size": 56, "projection_dim": 24, "hidden_act": "gelu"}
    (tmp / "vision.json").write_text(json.dumps(cfg))
    cv = comfy.clip_vision.ClipVisionModel(str(tmp / "vision.json"))
    models.init_random_(cv.model, 3)
    model = expand_model(models.build_model("sd15", tiny=True, seed=0))
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, 64, 64)
    masks[0, 8:40, 4:36] = 1
    masks[1, 30:60, 36:62] = 1
    ex = [Example(torch.rand(64, 64, 3, generator=g), masks, "a photo on the grass", ["dog", "cat"])]
    return model, models.build_clip(), models.build_vae(), cv, ex


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="SD1.5 / SD2.x checkpoint (.safetensors / .ckpt)")
    p.add_argument("--clip-vision", help="CLIP vision model (the paper: OpenCLIP ViT-H/14)")
    p.add_argument("--data", help="folder with images and subjects.json")
    p.add_argument("--init", help="start from these Subject-Diffusion weights (default: zero-init)")
    p.add_argument("--name", default="subject_diffusion", help="file name in models/subject_diffusion/")
    p.add_argument("--out", help="explicit output path (overrides --name)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=3e-5, help="AdamW learning rate (paper code: 3e-5)")
    p.add_argument("--warmup", type=int, default=1000, help="linear warm-up steps (paper code: 1000)")
    p.add_argument("--attn-weight", type=float, default=0.01, help="attention-control loss weight (paper: 0.01)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=1024, help="width of the new MLPs (paper: 1024; zero-init only)")
    p.add_argument("--checkpoint-every", type=int, default=100,
                   help="write the resume checkpoint every N steps (0 = only on Ctrl-C)")
    p.add_argument("--no-resume", action="store_true", help="ignore a .resume checkpoint of that name")
    p.add_argument("--batch-size", type=int, default=1, help="examples per step and process")
    p.add_argument("--grad-accumulation", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--training-dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when CUDA is available")
    p.add_argument("--random-tiny", action="store_true", help="smoke test on tiny random models, no files needed")
    a = p.parse_args(argv)
    host.select_gpu()
    host.bootstrap(cpu=True if a.cpu else None)


    rank = host.init_distributed(a.cpu)
    try:
        return _run(a, p, rank)
    finally:
        host.end_distributed()


def _run(a, p, rank: int) -> int:
    import tempfile

    import torch  # noqa: F401

    import folder_paths
    import personalize  # noqa: F401  (registers models/subject_diffusion)
    from personalize.nodes import adapters as ad
    from personalize.nodes import subject_training as st
    from personalize.nodes import training_engine as engine

    with tempfile.TemporaryDirectory() as tmp:
        if a.random_tiny:
            model, clip, vae, cv, examples = tiny_setup(Path(tmp))
        else:
            for flag in ("checkpoint", "clip_vision", "data"):
                if not getattr(a, flag):
                    p.error(f"--{flag.replace('_', '-')} is required (or use --random-tiny)")
            import comfy.clip_vision
            import comfy.sd

            model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(a.checkpoint, output_vae=True,
                                                                         output_clip=True)[:4]
            cv = comfy.clip_vision.load(a.clip_vision)
            examples = load_data(Path(a.data), a.resolution)
        if a.init:
            weights = ad.load_weights(a.init, "--init")
        else:
            width, tokens, embed = ad.vision_dims(cv)
            weights = ad.init_weights(model, width, tokens, embed, hidden=a.hidden, seed=a.seed)
        out = Path(a.out) if a.out else Path(folder_paths.get_folder_paths("subject_diffusion")[0]) / (
            a.name if a.name.endswith(".safetensors") else a.name + ".safetensors")
        trainer = st.SubjectTrainer(model, clip, vae, cv, weights, examples, lr=a.lr, attn_weight=a.attn_weight,
                                    warmup=a.warmup, seed=a.seed, batch_size=a.batch_size,
                                    training_dtype=a.training_dtype, grad_accumulation=a.grad_accumulation)
        t0 = time.time()

        def report(step, r):
            if rank == 0:
                print(f"step {step + 1}/{a.steps}  loss {r['loss']:.5f}  mse {r['mse']:.5f}  attn {r['attn']:.5f}  "
                      f"{time.time() - t0:.1f}s", file=sys.stderr, flush=True)

        rpath = engine.checkpoint_path(str(out))
        if not a.no_resume:
            engine.check_resume_family(rpath, trainer.family)
        trainer.train(a.steps, report, checkpoint=rpath, checkpoint_every=a.checkpoint_every,
                      resume=not a.no_resume, progress=False)
        res = trainer.result()
        if rank == 0:
            engine.save_file(res.state_dict(), str(out), res.metadata(), "Subject-Diffusion weights")
            engine.remove_checkpoint(rpath)
            if trainer.last_run.resumed_from:
                print(f"resumed from step {trainer.last_run.resumed_from}", file=sys.stderr)
            print(f"saved {out}")
        engine.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
