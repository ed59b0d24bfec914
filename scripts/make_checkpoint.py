"""Generate a full-size SD1.5 checkpoint with seeded random weights (UNet, CLIP-L, VAE in the real key layout).

``python -m scripts.make_checkpoint [--out PATH] [--seed N]``. Written once into the git-ignored cache
(``.cache/checkpoints/personalize-random-sd15.safetensors``) and loaded by the stock CheckpointLoaderSimple, so
end-to-end runs exercise the real loader, key layout and shapes. Random weights give noise images, by design.
"""
from __future__ import annotations

import argparse
import fcntl
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "scripts"

from . import host

NAME = "personalize-random-sd15.safetensors"


def default_path() -> Path:
    return host.cache_dir() / "checkpoints" / NAME


def build_state_dict(seed: int = 0):
    import torch

    from . import models
    import comfy.sd1_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL

    sd = {}
    unet = models.build_model("sd15", tiny=False, seed=seed).model.diffusion_model
    for k, v in unet.state_dict().items():
        sd["model.diffusion_model." + k] = v.half()
    del unet
    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32)
    models.init_random_(clip, seed + 1)
    for k, v in clip.state_dict().items():
        if k.startswith("clip_l.transformer.") and not k.endswith(("text_projection.weight", "logit_scale")):
            sd["cond_stage_model." + k[len("clip_l."):]] = v.half() if v.is_floating_point() else v
    pos = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    sd[pos] = torch.arange(77, dtype=torch.int64).unsqueeze(0)
    del clip
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    models.init_random_(vae, seed + 2)
    for k, v in vae.state_dict().items():
        sd["first_stage_model." + k] = v.half()
    return sd


def ensure_checkpoint(path: Path | None = None, seed: int = 0, quiet: bool = False) -> Path:
    path = Path(path) if path else default_path()
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # one writer: parallel test processes (make test's workers) wait for the first one's file instead of building
    # 2 GB each
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return path
        return _write(path, seed, quiet)


def _write(path: Path, seed: int, quiet: bool) -> Path:
    host.bootstrap()
    from personalize.nodes.weights_io import save_atomic

    t = time.time()
    if not quiet:
        print(f"[checkpoint] generating {path.name} (seeded random SD1.5 weights, ~2 GB) ...", file=sys.stderr)
    sd = build_state_dict(seed)
    save_atomic(sd, str(path), metadata={"personalize.generator": "scripts.make_checkpoint", "seed": str(seed),
                                         "note": "random weights for tests; images are noise"})
    if not quiet:
        print(f"[checkpoint] wrote {path} in {time.time() - t:.0f}s", file=sys.stderr)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(ensure_checkpoint(a.out, a.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
