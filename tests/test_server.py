"""Server level: the real ComfyUI server with the pack installed, driven through /prompt, /history and the headless
CLI, on the generated full-size SD1.5 checkpoint (random weights: the images are noise, the plumbing is real)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path


from scripts.server import free_port, get_json

REPO = Path(__file__).resolve().parents[1]
CKPT = "personalize-random-sd15.safetensors"


def post(url, payload):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read().decode())


def wait_history(server, prompt_id, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = get_json(f"{server.url}/history/{prompt_id}")
        if prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
            if h[prompt_id]["status"].get("status_str") in ("success", "error"):
                return h[prompt_id]
        time.sleep(0.5)
    raise AssertionError(f"prompt {prompt_id} did not finish; server log:\n{server.log_tail()}")


def cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "scripts.run_workflow", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_checkpoint_ksampler_vaedecode_saveimage_through_prompt_and_history(server):
    info = get_json(f"{server.url}/object_info/CheckpointLoaderSimple")
    assert CKPT in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a dog"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "server_test"}},
    }
    res = post(f"{server.url}/prompt", {"prompt": graph, "client_id": str(uuid.uuid4())})
    assert not res.get("node_errors"), res
    entry = wait_history(server, res["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = entry["outputs"]["7"]["images"]
    assert len(images) == 1 and images[0]["type"] == "output"
    saved = server.output_dir / images[0]["subfolder"] / images[0]["filename"]
    assert saved.is_file() and saved.stat().st_size > 0


def test_cli_runs_the_bootpig_example_workflow_end_to_end(server, tmp_path):
    """A UI-format workflow (what users share) converted with /object_info, queued, followed on the websocket."""
    r = cli("example_workflows/bootpig_reference.json", "--server", server.url, "--output-dir", str(tmp_path),
            "--set", "EmptyLatentImage.width=64", "--set", "EmptyLatentImage.height=64", "--set", "KSampler.steps=2",
            "--set", "PersonalizeBootPIGReferenceEncoder.resolution=64")
    assert r.returncode == 0, r.stderr[-3000:] + "\n" + server.log_tail()
    outs = sorted(tmp_path.glob("personalize_bootpig_*.png"))
    assert len(outs) == 1 and outs[0].stat().st_size > 0
    assert "node 8" in r.stderr and "2/2" in r.stderr  # progress from the websocket


def test_cli_prints_the_api_prompt_it_would_queue(server):
    r = cli("example_workflows/bootpig_reference.json", "--server", server.url, "--print-api")
    assert r.returncode == 0, r.stderr
    api = json.loads(r.stdout)
    assert api["6"]["class_type"] == "PersonalizeBootPIGRSAPatch"
    assert api["6"]["inputs"]["model"] == ["1", 0] and api["6"]["inputs"]["reference"] == ["3", 0]
    assert api["6"]["inputs"]["ref_scale"] == 1.1 and api["6"]["inputs"]["pooling"] == "softmax"
    assert api["8"]["inputs"]["seed"] == 0 and api["8"]["inputs"]["steps"] == 20
    assert "11" not in api  # the note is frontend-only


def one_error_line(r):
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_cli_missing_file(tmp_path):
    r = cli(str(tmp_path / "nope.json"), "--server", "http://127.0.0.1:9")
    assert r.returncode == 2
    assert "workflow file not found" in one_error_line(r)


def test_cli_malformed_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"nodes": [1, 2,,]}')
    r = cli(str(bad), "--server", "http://127.0.0.1:9")
    assert r.returncode == 2
    line = one_error_line(r)
    assert "is not valid JSON" in line and "line 1" in line


def test_cli_json_that_is_not_a_workflow(tmp_path):
    bad = tmp_path / "list.json"
    bad.write_text("[1, 2, 3]")
    r = cli(str(bad), "--server", "http://127.0.0.1:9")
    assert r.returncode == 2
    assert "not a ComfyUI workflow" in one_error_line(r)


def test_cli_unknown_node_type(server, tmp_path):
    wf = json.loads((REPO / "example_workflows" / "bootpig_reference.json").read_text())
    wf["nodes"][0]["type"] = "SomePackThatIsNotInstalled"
    f = tmp_path / "unknown.json"
    f.write_text(json.dumps(wf))
    r = cli(str(f), "--server", server.url)
    assert r.returncode == 2
    assert "unknown type 'SomePackThatIsNotInstalled'" in one_error_line(r)


def test_cli_server_not_reachable():
    port = free_port()
    r = cli("example_workflows/bootpig_reference.json", "--server", f"http://127.0.0.1:{port}")
    assert r.returncode == 3
    assert "cannot reach ComfyUI" in one_error_line(r)


def test_cli_reports_a_failing_node(server, tmp_path):
    r = cli("example_workflows/bootpig_reference.json", "--server", server.url, "--output-dir", str(tmp_path),
            "--set", "EmptyLatentImage.width=64", "--set", "EmptyLatentImage.height=64", "--set", "KSampler.steps=1",
            "--set", "PersonalizeBootPIGRSAPatch.start_percent=0.9", "--set", "PersonalizeBootPIGRSAPatch.end_percent=0.1",
            "--set", "PersonalizeBootPIGReferenceEncoder.resolution=64")
    assert r.returncode == 1
    line = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "PersonalizeBootPIGRSAPatch" in line[0] and "start_percent" in line[0], r.stderr
