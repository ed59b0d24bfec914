"""Workflow formats: UI format (what users share and drop on the canvas) -> API format (what POST /prompt takes).

The conversion follows the frontend's graphToPrompt: widget values are matched to a node's widget inputs in the
order given by ``/object_info`` (required, then optional), links become ``[node_id, slot]``, frontend-only nodes
(notes, reroutes, primitives) are resolved away, muted nodes dropped and bypassed nodes passed through.
"""
from __future__ import annotations

import json
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
NOTE_TYPES = {"Note", "MarkdownNote"}
MODE_MUTED, MODE_BYPASS = 2, 4


class WorkflowError(ValueError):
    pass


def is_api_format(data: Any) -> bool:
    return isinstance(data, dict) and "nodes" not in data and all(
        isinstance(v, dict) and "class_type" in v for v in data.values()) and len(data) > 0


def is_ui_format(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and isinstance(data.get("links", []), list)


def _is_widget(spec: Any) -> bool:
    if not isinstance(spec, (list, tuple)) or not spec:
        return False
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def widget_inputs(info: dict) -> list[tuple[str, Any]]:
    """(name, spec) of a node type's widget inputs, in the order the frontend lays out its widgets."""
    inputs = info.get("input", {})
    order = info.get("input_order") or {k: list(v.keys()) for k, v in inputs.items()}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = inputs.get(section, {}).get(name)
            if _is_widget(spec):
                out.append((name, spec))
    return out


def _has_control(name: str, spec: Any) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return bool(opts.get("control_after_generate")) or (spec[0] == "INT" and name in ("seed", "noise_seed"))


def _has_upload(spec: Any) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return any(opts.get(k) for k in ("image_upload", "video_upload", "audio_upload", "animated_image_upload"))


def ui_to_api(ui: dict, object_info: dict) -> dict:
    if not is_ui_format(ui):
        raise WorkflowError("not a UI-format workflow (no 'nodes' list)")
    if (ui.get("definitions") or {}).get("subgraphs"):
        raise WorkflowError("workflows with subgraphs are not supported by this converter; unpack the subgraphs first")
    nodes = {int(n["id"]): n for n in ui["nodes"]}
    links = {}
    for link in ui.get("links", []):
        if isinstance(link, dict):
            links[int(link["id"])] = (int(link["origin_id"]), int(link["origin_slot"]))
        else:
            links[int(link[0])] = (int(link[1]), int(link[2]))

    for nid, n in nodes.items():
        t = n.get("type")
        if t in NOTE_TYPES or t in ("Reroute", "PrimitiveNode") or n.get("mode") == MODE_MUTED:
            continue
        if t not in object_info:
            raise WorkflowError(f"node {nid} has unknown type '{t}': it is not installed in this ComfyUI "
                                "(missing custom node pack?)")

    def input_link(node: dict, name_or_index) -> int | None:
        for i, inp in enumerate(node.get("inputs") or []):
            if inp.get("name") == name_or_index or i == name_or_index:
                return inp.get("link")
        return None

    def resolve(link_id: int, want_type: str | None = None, seen=None):
        """Follow a link back through reroutes and bypassed nodes: ('link', [id, slot]) or ('value', v)."""
        seen = seen or set()
        if link_id in seen:
            raise WorkflowError(f"link {link_id} forms a cycle")
        seen.add(link_id)
        if link_id not in links:
            raise WorkflowError(f"link {link_id} is referenced by a node but missing from 'links'")
        src_id, slot = links[link_id]
        src = nodes.get(src_id)
        if src is None:
            raise WorkflowError(f"link {link_id} comes from node {src_id}, which does not exist")
        t = src.get("type")
        if t == "Reroute":
            up = input_link(src, 0)
            return None if up is None else resolve(up, want_type, seen)
        if t == "PrimitiveNode":
            vals = src.get("widgets_values") or []
            if not vals:
                raise WorkflowError(f"primitive node {src_id} has no value")
            return ("value", vals[0])
        if src.get("mode") == MODE_MUTED:
            return None
        if src.get("mode") == MODE_BYPASS:
            out_type = ((src.get("outputs") or [{}] * (slot + 1))[slot] or {}).get("type", want_type)
            for inp in src.get("inputs") or []:
                if inp.get("link") is not None and inp.get("type") == out_type:
                    return resolve(inp["link"], out_type, seen)
            return None
        return ("link", [str(src_id), slot])

    api: dict[str, dict] = {}
    for nid in sorted(nodes):
        n = nodes[nid]
        t = n.get("type")
        if t in NOTE_TYPES or t in ("Reroute", "PrimitiveNode") or n.get("mode") in (MODE_MUTED, MODE_BYPASS):
            continue
        info = object_info[t]
        inputs: dict[str, Any] = {}
        values = n.get("widgets_values")
        widgets = widget_inputs(info)
        if isinstance(values, dict):
            for name, _ in widgets:
                if name in values:
                    inputs[name] = values[name]
        else:
            values = list(values or [])
            pos = 0
            for name, spec in widgets:
                if pos >= len(values):
                    break
                inputs[name] = values[pos]
                pos += 1
                if _has_control(name, spec):
                    pos += 1  # the frontend always stores a control_after_generate value here ("fixed", ...)
                elif pos < len(values) and _has_upload(spec) and values[pos] in ("image", "video", "audio"):
                    pos += 1
        for inp in n.get("inputs") or []:
            if inp.get("link") is None:
                continue
            got = resolve(inp["link"], inp.get("type"))
            if got is None:
                continue
            kind, val = got
            inputs[inp["name"]] = val
        missing = [name for name in (info.get("input_order", {}).get("required")
                                     or list(info.get("input", {}).get("required", {})))
                   if name not in inputs]
        if missing:
            raise WorkflowError(f"node {nid} ({t}) has no value or link for required input(s): {', '.join(missing)}")
        entry = {"class_type": t, "inputs": inputs}
        if n.get("title"):
            entry["_meta"] = {"title": n["title"]}
        api[str(nid)] = entry
    # links into dropped (muted) nodes leave dangling references: drop them like the frontend does
    for entry in api.values():
        for k, v in list(entry["inputs"].items()):
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0] not in api:
                del entry["inputs"][k]
    if not api:
        raise WorkflowError("the workflow has no executable nodes")
    return api


def apply_overrides(api: dict, overrides: list[str]) -> dict:
    """``NODE.INPUT=VALUE``: NODE is a node id, a title or a class_type that names one node; VALUE is JSON or text."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise WorkflowError(f"--set {item!r}: expected NODE.INPUT=VALUE")
        target, value = item.split("=", 1)
        node_ref, name = target.rsplit(".", 1)
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        matches = [k for k, v in api.items() if k == node_ref] or \
                  [k for k, v in api.items() if v.get("_meta", {}).get("title") == node_ref] or \
                  [k for k, v in api.items() if v["class_type"] == node_ref]
        if not matches:
            raise WorkflowError(f"--set {item!r}: no node with id, title or type '{node_ref}'")
        if len(matches) > 1:
            raise WorkflowError(f"--set {item!r}: '{node_ref}' names {len(matches)} nodes ({', '.join(matches)}); use an id")
        api[matches[0]]["inputs"][name] = parsed
    return api


def check_types(api: dict, object_info: dict) -> None:
    for nid, entry in api.items():
        if entry.get("class_type") not in object_info:
            raise WorkflowError(f"node {nid} has unknown type '{entry.get('class_type')}': it is not installed in this "
                                "ComfyUI (missing custom node pack?)")
