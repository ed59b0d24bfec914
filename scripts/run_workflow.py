"""Run a ComfyUI workflow headless: ``python -m scripts.run_workflow WORKFLOW.json [--set NODE.INPUT=VALUE ...]``.

Takes UI-format workflows (what users share) or API format. Starts a local ComfyUI (the pack's pinned host, or
COMFYUI_ROOT) unless ``--server URL`` names a running one, queues the prompt, shows progress from the websocket,
saves the output images and exits non-zero with the failing node's message when the run fails.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from . import workflow as wf


class CliError(Exception):
    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def load_workflow(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise CliError(f"workflow file not found: {path}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CliError(f"{path} is not a text file (expected a workflow JSON)")
    except json.JSONDecodeError as e:
        raise CliError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}")
    if not (wf.is_ui_format(data) or wf.is_api_format(data)):
        raise CliError(f"{path} is JSON but not a ComfyUI workflow (neither UI format with 'nodes' nor API format)")
    return data


def http_json(url: str, payload: dict | None = None, timeout: float = 60.0):
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read().decode())
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        try:
            return {"__http_error__": e.code, **json.loads(body)}
        except json.JSONDecodeError:
            raise CliError(f"ComfyUI answered HTTP {e.code} for {url}: {body[:300]}", 1)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CliError(f"cannot reach ComfyUI at {'/'.join(url.split('/', 3)[:3])}: {reason}", 3)


def describe_node_errors(result: dict, api: dict) -> str:
    err = result.get("error", {})
    parts = [err.get("message", "prompt rejected") if isinstance(err, dict) else str(err)]
    for nid, ne in (result.get("node_errors") or {}).items():
        for e in ne.get("errors", []):
            detail = e.get("details") or e.get("message")
            parts.append(f"node {nid} ({api.get(nid, {}).get('class_type', ne.get('class_type', '?'))}): {detail}")
    return "; ".join(parts)


class Progress:
    def __init__(self, api: dict, quiet: bool):
        self.api, self.quiet, self.last = api, quiet, None
        self.tty = sys.stderr.isatty()

    def node(self, nid):
        if self.quiet or nid is None:
            return
        print(f"[run] node {nid} {self.api.get(str(nid), {}).get('class_type', '')}", file=sys.stderr)

    def step(self, nid, value, maximum):
        if self.quiet:
            return
        width = 30
        filled = int(width * value / max(maximum, 1))
        line = f"[run] node {nid}: [{'#' * filled}{'.' * (width - filled)}] {value}/{maximum}"
        if self.tty:
            print("\r" + line, end="\n" if value >= maximum else "", file=sys.stderr, flush=True)
        elif value >= maximum or value == 1:
            print(line, file=sys.stderr)


async def run_prompt(server: str, api: dict, timeout: float, quiet: bool) -> dict:
    import aiohttp

    client_id = str(uuid.uuid4())
    prompt_id = str(uuid.uuid4())
    progress = Progress(api, quiet)
    ws_url = server.replace("http://", "ws://").replace("https://", "wss://") + f"/ws?clientId={client_id}"
    async with aiohttp.ClientSession() as session:
        try:
            ws = await session.ws_connect(ws_url, heartbeat=30, max_msg_size=0)
        except (aiohttp.ClientError, OSError) as e:
            raise CliError(f"cannot reach ComfyUI at {server}: {e}", 3)
        async with ws:
            async with session.post(f"{server}/prompt", json={"prompt": api, "client_id": client_id,
                                                               "prompt_id": prompt_id}) as r:
                result = await r.json(content_type=None)
                if r.status != 200 or result.get("node_errors"):
                    raise CliError("the server rejected the workflow: " + describe_node_errors(result, api), 1)
                prompt_id = result.get("prompt_id", prompt_id)
            deadline = time.time() + timeout
            while True:
                remaining = deadline - time.time()
                if remaining <= 0:
                    raise CliError(f"the run did not finish within {timeout:.0f}s (prompt {prompt_id})", 1)
                try:
                    msg = await ws.receive(timeout=remaining)
                except asyncio.TimeoutError:
                    continue
                if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    raise CliError("the connection to ComfyUI closed during the run", 1)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue  # binary preview frames
                m = json.loads(msg.data)
                data = m.get("data", {})
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                kind = m.get("type")
                if kind == "executing":
                    if data.get("node") is None and data.get("prompt_id") == prompt_id:
                        break
                    progress.node(data.get("node"))
                elif kind == "progress":
                    progress.step(data.get("node"), data.get("value", 0), data.get("max", 1))
                elif kind == "execution_error":
                    raise CliError(f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                                   f"{data.get('exception_type', 'Error')}: {str(data.get('exception_message', '')).strip()}", 1)
                elif kind == "execution_interrupted":
                    raise CliError("the run was interrupted", 1)
                elif kind == "execution_success":
                    break
    entry = None
    for _ in range(120):  # the history entry is stored just after the last websocket message
        entry = http_json(f"{server}/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            break
        await asyncio.sleep(0.25)
    if not entry:
        raise CliError(f"prompt {prompt_id} finished but is missing from /history", 1)
    status = entry.get("status", {})
    if status.get("status_str") == "error":
        msgs = [m for m in status.get("messages", []) if m and m[0] == "execution_error"]
        detail = msgs[0][1] if msgs else {}
        raise CliError(f"node {detail.get('node_id')} ({detail.get('node_type')}) failed: "
                       f"{detail.get('exception_message', 'unknown error')}".strip(), 1)
    return entry


def save_outputs(server: str, entry: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for nid, out in (entry.get("outputs") or {}).items():
        for img in out.get("images", []) or []:
            if img.get("type") != "output":
                continue
            q = urllib.parse.urlencode({k: img.get(k, "") for k in ("filename", "subfolder", "type")})
            target = out_dir / Path(img["filename"]).name
            tmp = target.with_name(f".{target.name}.part")
            with urllib.request.urlopen(f"{server}/view?{q}", timeout=60) as r, open(tmp, "wb") as f:
                f.write(r.read())
            os.replace(tmp, target)
            saved.append(target)
    return saved


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m scripts.run_workflow", description=__doc__.split("\n\n")[0])
    p.add_argument("workflow", help="workflow JSON, UI format (as shared/saved from the page) or API format")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="override an input; NODE is a node id, title or unique class_type; VALUE is JSON or text")
    p.add_argument("--server", help="URL of a running ComfyUI (default: start a local one for this run)")
    p.add_argument("--output-dir", default="output", help="where output images are saved (default: ./output)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run (default 3600)")
    p.add_argument("--print-api", action="store_true", help="print the API-format prompt and exit without running")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    server_proc = None
    try:
        data = load_workflow(args.workflow)
        if args.server:
            server = args.server.rstrip("/")
            if not server.startswith(("http://", "https://")):
                raise CliError(f"--server must be an http(s) URL, got {args.server!r}")
        else:
            from .server import LocalServer

            if not args.quiet:
                print("[run] starting a local ComfyUI ...", file=sys.stderr)
            try:
                server_proc = LocalServer().start()
            except RuntimeError as e:
                raise CliError(str(e).splitlines()[0], 3)
            server = server_proc.url
        object_info = http_json(f"{server}/object_info", timeout=120)
        if wf.is_ui_format(data):
            api = wf.ui_to_api(data, object_info)
        else:
            api = data
            wf.check_types(api, object_info)
        api = wf.apply_overrides(api, args.overrides)
        if args.print_api:
            print(json.dumps(api, indent=2))
            return 0
        entry = asyncio.run(run_prompt(server, api, args.timeout, args.quiet))
        saved = save_outputs(server, entry, Path(args.output_dir))
        for s in saved:
            print(s)
        if not args.quiet:
            print(f"[run] done: {len(saved)} image(s) in {args.output_dir}", file=sys.stderr)
        return 0
    except wf.WorkflowError as e:
        print(f"error: {args.workflow}: {e}", file=sys.stderr)
        return 2
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        if server_proc is not None:
            server_proc.stop()


if __name__ == "__main__":
    sys.exit(main())
