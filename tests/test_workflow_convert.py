"""UI-format -> API-format conversion (the frontend's graphToPrompt, re-done for headless runs)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts import workflow as wf

REPO = Path(__file__).resolve().parents[1]

# object_info entries as ComfyUI 0.3.75 serves them (trimmed to what the converter reads)
INFO = {
    "KSampler": {"input": {"required": {
        "model": ["MODEL", {}], "seed": ["INT", {"default": 0, "control_after_generate": True}],
        "steps": ["INT", {"default": 20}], "cfg": ["FLOAT", {"default": 8.0}],
        "sampler_name": [["euler", "ddim"], {}], "scheduler": [["normal", "karras"], {}],
        "positive": ["CONDITIONING", {}], "negative": ["CONDITIONING", {}], "latent_image": ["LATENT", {}],
        "denoise": ["FLOAT", {"default": 1.0}]}},
        "input_order": {"required": ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                                     "negative", "latent_image", "denoise"]}},
    "LoadImage": {"input": {"required": {"image": [["example.png"], {"image_upload": True}]}},
                  "input_order": {"required": ["image"]}},
    "Src": {"input": {"required": {}}, "input_order": {"required": []}},
    "Pass": {"input": {"required": {"x": ["LATENT", {}]}}, "input_order": {"required": ["x"]}},
    "Sink": {"input": {"required": {"x": ["LATENT", {}], "s": ["STRING", {"forceInput": True}]},
                       "optional": {"n": ["INT", {}]}},
             "input_order": {"required": ["x", "s"], "optional": ["n"]}},
}


def node(nid, t, inputs=(), outputs=(), widgets=(), mode=0):
    return {"id": nid, "type": t, "mode": mode, "widgets_values": list(widgets),
            "inputs": [{"name": n, "type": ty, "link": link} for n, ty, link in inputs],
            "outputs": [{"name": ty, "type": ty} for ty in outputs]}


def test_widget_values_follow_input_order_and_skip_control_values():
    ui = {"nodes": [node(1, "Src", outputs=["MODEL"]),
                    node(2, "KSampler", inputs=[("model", "MODEL", 1)], widgets=[7, "fixed", 4, 2.5, "ddim", "karras", 0.5]),
                    node(3, "LoadImage", widgets=["example.png", "image"])],
          "links": [[1, 1, 0, 2, 0, "MODEL"]]}
    info = dict(INFO, KSampler={**INFO["KSampler"], "input": {"required": {
        k: v for k, v in INFO["KSampler"]["input"]["required"].items() if k not in ("positive", "negative", "latent_image")}},
        "input_order": {"required": ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"]}})
    api = wf.ui_to_api(ui, info)
    assert api["2"]["inputs"] == {"model": ["1", 0], "seed": 7, "steps": 4, "cfg": 2.5, "sampler_name": "ddim",
                                  "scheduler": "karras", "denoise": 0.5}
    assert api["3"]["inputs"] == {"image": "example.png"}


def test_reroutes_primitives_notes_muted_and_bypassed_nodes_are_resolved():
    ui = {"nodes": [node(1, "Src", outputs=["LATENT"]),
                    node(2, "Reroute", inputs=[("", "*", 1)], outputs=["LATENT"]),
                    node(3, "Pass", inputs=[("x", "LATENT", 2)], outputs=["LATENT"], mode=4),   # bypassed
                    node(4, "PrimitiveNode", outputs=["STRING"], widgets=["hello"]),
                    node(5, "Sink", inputs=[("x", "LATENT", 3), ("s", "STRING", 4)], widgets=[3]),
                    node(6, "Note", widgets=["just a note"]),
                    node(7, "Pass", inputs=[("x", "LATENT", None)], outputs=["LATENT"], mode=2)],  # muted
          "links": [[1, 1, 0, 2, 0, "LATENT"], [2, 2, 0, 3, 0, "LATENT"], [3, 3, 0, 5, 0, "LATENT"],
                    [4, 4, 0, 5, 1, "STRING"]]}
    api = wf.ui_to_api(ui, INFO)
    assert set(api) == {"1", "5"}
    assert api["5"]["inputs"] == {"x": ["1", 0], "s": "hello", "n": 3}


def test_unknown_type_and_missing_required_input_are_named():
    with pytest.raises(wf.WorkflowError, match=r"node 1 has unknown type 'Nope'"):
        wf.ui_to_api({"nodes": [node(1, "Nope")], "links": []}, INFO)
    with pytest.raises(wf.WorkflowError, match=r"node 1 \(Pass\) has no value or link for required input\(s\): x"):
        wf.ui_to_api({"nodes": [node(1, "Pass", inputs=[("x", "LATENT", None)])], "links": []}, INFO)


def test_overrides_by_id_title_and_type():
    api = {"1": {"class_type": "KSampler", "inputs": {"steps": 20}, "_meta": {"title": "Sampler"}},
           "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 512}}}
    wf.apply_overrides(api, ["1.steps=3", "Sampler.cfg=2.5", "EmptyLatentImage.width=64", "1.sampler_name=euler"])
    assert api["1"]["inputs"] == {"steps": 3, "cfg": 2.5, "sampler_name": "euler"}
    assert api["2"]["inputs"]["width"] == 64
    with pytest.raises(wf.WorkflowError, match="no node"):
        wf.apply_overrides(api, ["Missing.x=1"])


def test_every_example_workflow_is_ui_format_with_unique_ids():
    files = sorted((REPO / "example_workflows").glob("*.json"))
    assert files, "the pack ships example workflows"
    for f in files:
        data = json.loads(f.read_text())
        assert wf.is_ui_format(data), f.name
        ids = [n["id"] for n in data["nodes"]]
        assert len(ids) == len(set(ids)), f.name
        link_ids = [link[0] for link in data["links"]]
        assert len(link_ids) == len(set(link_ids)), f.name


def test_example_workflows_widget_values_fit_their_nodes(server):
    """The frontend reads widgets_values positionally (a seed is followed by its control value, an image combo by
    its upload value): a file with one value too few or too many loads shifted in the page."""
    from scripts.server import get_json

    info = get_json(f"{server.url}/object_info")
    for f in sorted((REPO / "example_workflows").glob("*.json")):
        for n in json.loads(f.read_text())["nodes"]:
            if n["type"] not in info or not isinstance(n.get("widgets_values"), list):
                continue
            expected = 0
            for name, spec in wf.widget_inputs(info[n["type"]]):
                expected += 1 + int(wf._has_control(name, spec)) + int(wf._has_upload(spec))
            assert len(n["widgets_values"]) == expected, (
                f"{f.name} node {n['id']} ({n['type']}): {len(n['widgets_values'])} widget values, the page expects "
                f"{expected} ({[name for name, _ in wf.widget_inputs(info[n['type']])]})")


COMFY_CLI = REPO / ".cache" / "comfy-cli"


@pytest.fixture(scope="module")
def comfy_cli_convert():
    """comfy-cli's convert_ui_to_api (what `comfy run --workflow X.json` sends), from .cache/comfy-cli."""
    import sys

    if not (COMFY_CLI / "comfy_cli").is_dir():
        pytest.fail("comfy-cli is not installed in .cache/comfy-cli: run `make setup` (scripts/setup.sh)")
    sys.path.append(str(COMFY_CLI))  # last: it must not shadow anything of the venv
    try:
        from comfy_cli.workflow_to_api import convert_ui_to_api
    finally:
        sys.path.remove(str(COMFY_CLI))
    return convert_ui_to_api


@pytest.mark.parametrize("path", sorted((REPO / "example_workflows").glob("*.json")), ids=lambda p: p.stem)
def test_conversion_equals_comfy_cli_on_every_example(server, comfy_cli_convert, path):
    """`python -m scripts.run_workflow X.json` and `comfy run --workflow X.json` queue the same API prompt."""
    from scripts.server import get_json

    info = get_json(f"{server.url}/object_info")
    data = json.loads(path.read_text())
    ours = wf.ui_to_api(data, info)
    theirs = comfy_cli_convert(json.loads(path.read_text()), info)

    def norm(api):
        return {k: (v["class_type"], json.loads(json.dumps(v["inputs"]))) for k, v in api.items()}

    a, b = norm(ours), norm(theirs)
    diffs = [f"node {k}: ours {a.get(k)} vs comfy-cli {b.get(k)}" for k in sorted(set(a) | set(b), key=int)
             if a.get(k) != b.get(k)]
    assert not diffs, f"{path.name}:\n" + "\n".join(diffs)
