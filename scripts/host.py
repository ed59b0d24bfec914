"""Find and boot the ComfyUI host in-process (tests, benchmarks, generators).

The pack's shared package is called ``nodes`` like ComfyUI's own ``nodes.py``; the repo root must therefore never
be on ``sys.path`` ahead of ComfyUI. The pack is imported as ``personalize`` through a link in an import root.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = "personalize"


def cache_dir() -> Path:
    d = Path(os.environ.get("PERSONALIZE_CACHE", REPO / ".cache"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def comfyui_root() -> Path:
    root = Path(os.environ.get("COMFYUI_ROOT", REPO / ".comfyui")).resolve()
    if not (root / "main.py").is_file():
        raise SystemExit(f"error: no ComfyUI at {root} (run `make setup`, or set COMFYUI_ROOT to a ComfyUI checkout)")
    return root


def import_root() -> Path:
    """A folder holding one link, ``personalize`` -> the repo, so that ``import personalize`` loads the pack."""
    d = cache_dir() / "importroot"
    d.mkdir(parents=True, exist_ok=True)
    link = d / PACK_NAME
    if not link.exists():
        tmp = d / f".{PACK_NAME}.{os.getpid()}"
        os.symlink(REPO, tmp)
        os.replace(tmp, link)
    return d


def bootstrap(cpu: bool | None = None) -> Path:
    """Put ComfyUI first on sys.path, set its CLI args for in-process use, and make the pack importable."""
    root = comfyui_root()
    repo = os.path.realpath(REPO)
    sys.path[:] = [str(root), str(import_root())] + [
        p for p in sys.path if p not in ("", ".") and os.path.realpath(p) not in (repo, str(root))
    ]
    import comfy.options  # noqa: F401  (args are not parsed from our argv: comfy.options.args_parsing stays False)
    from comfy.cli_args import args

    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    args.cpu = bool(cpu)
    return root


def extra_model_paths_yaml(out: Path) -> Path:
    """A model-paths file that adds the pack's generated checkpoints (cache/checkpoints) to a ComfyUI server."""
    ckpt = cache_dir() / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "personalize_cache:\n"
        f"    base_path: {cache_dir()}\n"
        "    checkpoints: checkpoints\n"
        "    loras: loras\n"
    )
    return out


def select_gpu() -> None:
    """One GPU per process under torchrun: expose only LOCAL_RANK's GPU before torch / ComfyUI initialise CUDA."""
    local = os.environ.get("LOCAL_RANK")
    if local is None or "WORLD_SIZE" not in os.environ:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else None
    if ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[int(local) % len(ids)]
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = local


def init_distributed(cpu: bool = False, timeout_hours: float = 2.0) -> int:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on CUDA, gloo on the CPU or with ``cpu``) and
    return this process's rank; alone: 0. The timeout allows for rank 0 sampling (class images) while the others
    wait at a barrier. Pair with ``end_distributed()`` in a ``finally``."""
    import datetime

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if (torch.cuda.is_available() and not cpu) else "gloo",
                                timeout=datetime.timedelta(hours=timeout_hours))
    return dist.get_rank() if dist.is_initialized() else 0


def end_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def load_models(checkpoint: str | None, random_tiny: int | None = None):
    """(model, clip, vae) of a checkpoint file (or a name in models/checkpoints), or seeded random tiny SD1.5 models
    (``random_tiny`` = the seed; for tests and smoke runs of the training scripts)."""
    if random_tiny is not None:
        from . import models

        seed = random_tiny
        return (models.build_model("sd15", tiny=True, seed=seed), models.build_clip(tiny=True, seed=seed),
                models.build_vae(seed=seed))
    import comfy.sd
    import folder_paths

    path = checkpoint if os.path.isfile(checkpoint) else folder_paths.get_full_path("checkpoints", checkpoint)
    if path is None:
        raise SystemExit(f"error: --checkpoint: no file {checkpoint!r} (nor in models/checkpoints)")
    out = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True,
                                                embedding_directory=folder_paths.get_folder_paths("embeddings"))
    return out[0], out[1], out[2]
