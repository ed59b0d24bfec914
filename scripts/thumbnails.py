"""Render each example workflow's template thumbnail (``example_workflows/<name>.jpg``) from a real run of it.

    python -m scripts.thumbnails [example_workflows/X.json ...] [--keep DIR]

Starts the pinned ComfyUI with the pack, converts every workflow to API format (scripts/workflow.py) and runs it on
the pack's toy-world model, which runs on a CPU in seconds:

- workflows built on the toy model (``PersonalizeToyWorldLoader``) run as they are;
- workflows made for a real checkpoint run on the toy model instead: ``CheckpointLoaderSimple`` becomes the Toy World
  Loader (same MODEL/CLIP/VAE outputs), every ``LoadImage`` the Toy World Subject ``ball_00`` (its reference renders
  and masks, in the IMAGE/MASK slots), the word "dog" in text inputs becomes "ball", latents and reference
  resolutions 128 px (the shipped toy model's size), and the DreamBooth trainer a short run (TOY_INPUTS below). Every other node and setting is the
  workflow's own; muted nodes stay muted.

The image of the SaveImage node fed by the last VAE Decode becomes the thumbnail: up to 4 images in a 2x2 grid,
256x256 px, JPEG quality 85 (about 6-10 KB). Reproducible: the workflows' seeds are fixed (same machine, same images).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOY_SUBJECT = "ball_00"
THUMB = 256
# per node type: inputs set for the toy model's 128 px world (a real checkpoint's settings would take hours on a CPU)
TOY_INPUTS = {
    "EmptyLatentImage": {"width": 128, "height": 128},
    "PersonalizeBootPIGReferenceEncoder": {"resolution": 128},
    "PersonalizePickAndDrawReference": {"resolution": 128},
    "PersonalizeSubjectDiffusionLocationMaskConcat": {"boxes": "28, 28, 72, 72"},
    "PersonalizeDreamBoothLoRATrainer": {"steps": 60, "num_class_images": 4, "class_steps": 20, "resolution": 128,
                                         "learning_rate": 1e-3, "checkpoint_every": 0, "overwrite": True,
                                         "save_name": "thumbnail_dreambooth"},
}


def to_toy(api: dict) -> dict:
    """The API prompt on the toy model (see the module docstring); toy-model prompts are returned unchanged."""
    api = json.loads(json.dumps(api))
    if not any(v["class_type"] == "CheckpointLoaderSimple" for v in api.values()):
        return api
    for node in api.values():
        t = node["class_type"]
        if t == "CheckpointLoaderSimple":
            node["class_type"], node["inputs"] = "PersonalizeToyWorldLoader", {"source": "trained"}
        elif t == "LoadImage":
            node["class_type"] = "PersonalizeToyWorldSubject"
            node["inputs"] = {"subject": TOY_SUBJECT, "references": 4, "prompt_index": 0}
        for k, v in list(node["inputs"].items()):
            if isinstance(v, str):
                node["inputs"][k] = v.replace("dog", "ball")
        node["inputs"].update(TOY_INPUTS.get(node["class_type"], {}))
    return api


def main_output(api: dict) -> str:
    """Id of the SaveImage node fed by a VAE Decode (the last one by id when there are several)."""
    cands = [k for k, v in api.items() if v["class_type"] == "SaveImage"
             and isinstance(v["inputs"].get("images"), list)
             and api.get(v["inputs"]["images"][0], {}).get("class_type") == "VAEDecode"]
    if not cands:
        raise SystemExit("no SaveImage fed by a VAE Decode in this workflow: nothing to make a thumbnail of")
    return max(cands, key=int)


def thumbnail(images: list[Path], out: Path) -> None:
    from PIL import Image

    ims = [Image.open(p).convert("RGB") for p in images[:4]]
    if len(ims) == 1:
        sheet = ims[0].resize((THUMB, THUMB), Image.LANCZOS)
    else:
        cell = THUMB // 2
        sheet = Image.new("RGB", (THUMB, THUMB), (24, 24, 24))
        for i, im in enumerate(ims):
            sheet.paste(im.resize((cell, cell), Image.LANCZOS), ((i % 2) * cell, (i // 2) * cell))
    buf = io.BytesIO()
    sheet.save(buf, "JPEG", quality=85, optimize=True)
    tmp = out.with_name(f".{out.name}.part")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(out)


def main(argv=None) -> int:
    from . import workflow as wf
    from .run_workflow import run_prompt, save_outputs
    from .server import LocalServer, get_json

    ap = argparse.ArgumentParser(prog="python -m scripts.thumbnails", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path, help="workflows (default: example_workflows/*.json)")
    ap.add_argument("--keep", type=Path, help="also keep the full-size outputs in this folder")
    args = ap.parse_args(argv)
    files = args.files or sorted((REPO / "example_workflows").glob("*.json"))
    with LocalServer() as srv:
        info = get_json(f"{srv.url}/object_info", timeout=60)
        for f in files:
            api = to_toy(wf.ui_to_api(json.loads(f.read_text()), info))
            keep = main_output(api)
            entry = asyncio.run(run_prompt(srv.url, api, timeout=1800, quiet=True))
            entry["outputs"] = {keep: entry["outputs"][keep]}
            with tempfile.TemporaryDirectory() as d:
                saved = save_outputs(srv.url, entry, args.keep / f.stem if args.keep else Path(d))
                out = f.with_suffix(".jpg")
                thumbnail(saved, out)
            print(f"[thumbnails] {out.name}: {len(saved)} image(s) of node {keep}, {out.stat().st_size} bytes",
                  file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
