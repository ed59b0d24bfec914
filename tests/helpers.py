"""Shared test helpers: run a V1 node the way ComfyUI does, sample with the stock KSampler path."""
from __future__ import annotations

import torch


def run_node(node_cls, **inputs):
    """Call a V1 node's FUNCTION on a fresh instance under inference mode, as ComfyUI's executor does."""
    with torch.inference_mode():
        return getattr(node_cls(), node_cls.FUNCTION)(**inputs)


def run_api(api: dict, classes: dict, override=None) -> list:
    """Execute an API-format prompt in-process, node by node; SaveImage returns its images instead of writing them.
    ``override(class_type, args)`` may change a node's arguments in place, or return its outputs to replace the node
    (e.g. a loader of a file the test machine lacks)."""
    done, saved, pending = {}, [], dict(api)
    while pending:
        for nid, node in list(pending.items()):
            ins = node["inputs"]
            if any(isinstance(v, list) and str(v[0]) not in done for v in ins.values()):
                continue
            args = {k: (done[str(v[0])][v[1]] if isinstance(v, list) else v) for k, v in ins.items()}
            ct = node["class_type"]
            out = override(ct, args) if override else None
            if out is not None:
                done[nid] = out
            elif ct == "SaveImage":
                saved.append(args["images"])
                done[nid] = ()
            else:
                cls = classes[ct]
                it = cls.INPUT_TYPES()
                args = {k: v for k, v in args.items() if k in {**it.get("required", {}), **it.get("optional", {})}}
                done[nid] = run_node(cls, **args)
            del pending[nid]
    return saved


def sample(model, positive, negative, latent=None, steps=3, cfg=5.0, seed=1, sampler="euler", scheduler="normal",
           size=(8, 8), batch=1, denoise=1.0):
    """Stock KSampler (nodes.common_ksampler) under inference mode; returns the latent samples tensor."""
    import nodes

    if latent is None:
        latent = {"samples": torch.zeros(batch, 4, *size)}
    with torch.inference_mode():
        out = nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent,
                                    denoise=denoise, disable_noise=False)[0]
    return out["samples"].clone()


def convert_example(name: str) -> dict:
    """An example workflow converted to API format in-process, with /object_info built from the registered node
    classes (the pack's and ComfyUI's core nodes) the way the server builds it."""
    import json
    from pathlib import Path

    import nodes as comfy_nodes

    import personalize
    from scripts import workflow as wf

    ui = json.loads((Path(__file__).resolve().parents[1] / "example_workflows" / name).read_text())
    info = {}
    for n in ui["nodes"]:
        cls = personalize.NODE_CLASS_MAPPINGS.get(n["type"]) or comfy_nodes.NODE_CLASS_MAPPINGS.get(n["type"])
        if cls is not None:
            spec = cls.INPUT_TYPES()
            info[n["type"]] = {"input": spec, "input_order": {k: list(v) for k, v in spec.items()}}
    return wf.ui_to_api(ui, info)
