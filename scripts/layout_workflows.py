"""Lay out example workflows left to right, without overlap, as the frontend sizes the nodes; group each technique.

    python -m scripts.layout_workflows [example_workflows/X.json ...] [--frontend-path DIR ...] [--check]

Starts the pinned ComfyUI (and one server per ``--frontend-path``, default: ``.cache/frontend-latest`` when it is
there), loads every workflow in Chromium, reads each node's size as the page lays it out (and its minimum size), and
rewrites the JSON:

- columns by data flow: a node sits one column right of its rightmost input; a node without inputs (loader, empty
  latent, image) sits just left of its first consumer;
- one band per technique (the pack's node category: BootPIG, Pick-and-Draw, ...) over the columns its nodes use,
  a LiteGraph group titled with the technique and holding a short Note, placed under the bands before it that share
  a column; the other nodes (loaders, prompts, sampler, save) fill each column under the groups that cover it;
- the workflow's other notes in a row at the bottom;
- sizes = the largest the pages gave (stored sizes are kept when larger), positions from the column widths and band
  heights plus gaps; ``extra.ds`` shows the whole graph in a 1920x1080 window.

Rerunning it on a laid-out file gives the same layout (it is a function of the graph and the measured sizes).

Existing nodes, links and widget values are untouched; a missing technique note is added (a ``Note`` node).
``--check`` only reports overlaps. The browser test (tests/test_browser.py) holds the result on both frontends.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HGAP, VGAP, BAND_GAP = 60, 40, 60
GROUP_PAD, GROUP_TITLE = 24, 46
TITLE_H = 30
NOTE_TYPES = ("Note", "MarkdownNote")
NOTE_W, NOTE_H = 300, 110
TECHNIQUES = {  # pack category -> (group title, colour, short note)
    "personalize/BootPIG": ("BootPIG", "#3f5f9e", "BootPIG: the Reference Encoder runs the reference photo through a "
                            "copy of the UNet; the RSA Patch lets the model's self-attention also attend to those "
                            "features while it samples (no training needed)."),
    "personalize/PickAndDraw": ("Pick-and-Draw", "#3f8a6e", "Pick-and-Draw: training-free guidance. Appearance "
                                "Picking pulls the subject's features toward the reference; Layout Drawing keeps the "
                                "class layout. Type the same prompt here as in the Prompt node."),
    "personalize/Subject-Diffusion": ("Subject-Diffusion", "#8a5a3f", "Subject-Diffusion: a location-mask channel "
                                      "says where the subject goes; with trained weights the adapter and image "
                                      "prompt carry its appearance."),
    "personalize/DreamBooth": ("DreamBooth", "#7a3f8a", "DreamBooth: a LoRA trained on 3-5 photos with prior "
                               "preservation, saved to models/loras and applied to the model and CLIP below."),
    "personalize/ToyWorld": ("Toy world", "#6b6b3f", "Toy world: the pack's own small 128x128 model and held-out "
                             "subjects (weights ship in weights/toyworld); runs on a CPU in seconds."),
}
OTHER = "other"


def technique_of(node: dict, object_info: dict) -> str:
    cat = (object_info.get(node["type"]) or {}).get("category", "")
    return cat if cat in TECHNIQUES else OTHER


def _links(data: dict) -> list[tuple[int, int]]:
    out = []
    for link in data.get("links", []):
        if isinstance(link, dict):
            out.append((int(link["origin_id"]), int(link["target_id"])))
        else:
            out.append((int(link[1]), int(link[3])))
    return out


def columns(data: dict) -> dict[int, int]:
    """Column of every non-note node: longest path from the sources; sources just left of their first consumer."""
    nodes = {int(n["id"]): n for n in data["nodes"] if n["type"] not in NOTE_TYPES}
    ins: dict[int, set[int]] = {i: set() for i in nodes}
    outs: dict[int, set[int]] = {i: set() for i in nodes}
    for a, b in _links(data):
        if a in nodes and b in nodes:
            ins[b].add(a)
            outs[a].add(b)
    col: dict[int, int] = {}

    def depth(i, seen=()):
        if i in col:
            return col[i]
        if i in seen:
            raise ValueError(f"cycle through node {i}")
        col[i] = 0 if not ins[i] else 1 + max(depth(j, seen + (i,)) for j in ins[i])
        return col[i]

    for i in nodes:
        depth(i)
    for i in sorted(nodes, key=lambda k: -col[k]):  # sources move right, next to their first consumer
        if not ins[i] and outs[i]:
            col[i] = max(0, min(col[j] for j in outs[i]) - 1)
    return col


def layout(data: dict, sizes: dict[int, list[float]], object_info: dict) -> dict:
    """A copy of ``data`` with positions, sizes, groups and notes laid out (``sizes``: id -> [w, h] body size)."""
    data = json.loads(json.dumps(data))
    nodes = {int(n["id"]): n for n in data["nodes"]}
    for i, n in nodes.items():
        if i in sizes:
            n["size"] = [int(round(max(a, b))) for a, b in zip(sizes[i], n.get("size") or [0, 0])]
    col = columns(data)
    bands: dict[str, list[int]] = {}
    for i in sorted(col, key=lambda k: (col[k], nodes[k]["pos"][1] if nodes[k].get("pos") else 0, k)):
        bands.setdefault(technique_of(nodes[i], object_info), []).append(i)
    order = [t for t in TECHNIQUES if t in bands] + ([OTHER] if OTHER in bands else [])
    # one short Note per technique band (kept if the file has one titled like the group); free notes go to "other"
    next_id = max(nodes) + 1
    free_notes = [i for i, n in nodes.items() if n["type"] in NOTE_TYPES]
    for t in order:
        if t == OTHER:
            continue
        title, color, text = TECHNIQUES[t]
        mine = [i for i in free_notes if nodes[i].get("title") == f"{title} (note)"]
        if mine:
            note_id = mine[0]
            free_notes.remove(note_id)
        else:
            note_id = next_id
            next_id += 1
            nodes[note_id] = {"id": note_id, "type": "Note", "pos": [0, 0], "size": [NOTE_W, NOTE_H], "flags": {},
                              "order": len(nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
                              "title": f"{title} (note)", "widgets_values": [text], "color": "#432",
                              "bgcolor": "#653"}
            data["nodes"].append(nodes[note_id])
        first = min(col[i] for i in bands[t])
        col[note_id] = first
        bands[t].insert(0, note_id)
    data["last_node_id"] = max(int(data.get("last_node_id", 0)), max(nodes))

    ncols = max(col.values()) + 1
    width = [0.0] * ncols
    for i, c in col.items():
        width[c] = max(width[c], nodes[i]["size"][0])
    xs, x = [], 40.0 + GROUP_PAD
    for c in range(ncols):
        xs.append(x)
        x += width[c] + HGAP
    groups = []
    floor = [40.0] * ncols  # per column: the lowest y used so far by the bands above
    for t in order:
        grouped = t != OTHER
        used = sorted({col[i] for i in bands[t]})
        span = range(used[0], used[-1] + 1) if grouped else None
        # a group spans its columns; the other nodes fill each column under whatever group covers it
        y0 = max(floor[c] for c in span) if grouped else None
        bottom_all = 0.0
        for c in range(ncols):
            members = [i for i in bands[t] if col[i] == c]
            if not members and not (grouped and c in span):
                continue
            cy = (y0 + GROUP_TITLE + GROUP_PAD) if grouped else floor[c]
            for i in members:
                n = nodes[i]
                n["pos"] = [int(xs[c]), int(cy + TITLE_H)]
                cy += TITLE_H + n["size"][1] + VGAP
            bottom_all = max(bottom_all, cy - VGAP)
            if not grouped:
                floor[c] = cy - VGAP + BAND_GAP
        if grouped:
            members = bands[t]
            x0 = min(nodes[i]["pos"][0] for i in members) - GROUP_PAD
            x1 = max(nodes[i]["pos"][0] + nodes[i]["size"][0] for i in members) + GROUP_PAD
            title, color, _ = TECHNIQUES[t]
            bottom = bottom_all + GROUP_PAD
            groups.append({"id": len(groups) + 1, "title": title, "color": color, "font_size": 24, "flags": {},
                           "bounding": [int(x0), int(y0), int(x1 - x0), int(bottom - y0)]})
            for c in span:
                floor[c] = bottom + BAND_GAP
    y = max(max(n["pos"][1] + n["size"][1] for i, n in nodes.items() if i not in free_notes),
            max((g["bounding"][1] + g["bounding"][3] for g in groups), default=0)) + 40
    data["groups"] = groups
    # the workflow's own (longer) notes: a row under everything, so that their width widens no column
    nx = 40.0 + GROUP_PAD
    for i in free_notes:
        nodes[i]["pos"] = [int(nx), int(y + TITLE_H)]
        nx += nodes[i]["size"][0] + HGAP
    if free_notes:
        y += TITLE_H + max(nodes[i]["size"][1] for i in free_notes) + 40
    total_w, total_h = max(x, nx), y
    # the canvas under the frontend's side bar (~60 px) and top bars (~100 px) of a 1920x1080 window
    # (not below 0.6: LiteGraph draws no text under that zoom; larger graphs are panned)
    scale = round(max(0.6, min(1.0, 1780 / (total_w - 40), 900 / (total_h - 40))), 3)
    data.setdefault("extra", {})["ds"] = {"scale": scale, "offset": [round(90 / scale - 40), round(150 / scale - 40)]}
    data["nodes"] = sorted(data["nodes"], key=lambda n: int(n["id"]))
    return data


def measure(url: str, files: list[Path]) -> tuple[dict[str, dict[int, list[float]]], str]:
    """{workflow stem: {node id: [w, h]}} as the page at ``url`` sizes the nodes (max of size and minimum size)."""
    from playwright.sync_api import sync_playwright

    from . import browser as B

    out = {}
    with sync_playwright() as p:
        b = B.launch(p)
        try:
            pg = B.open_page(b, url)
            version = B.frontend_version(pg)
            for f in files:
                B.load_workflow(pg, json.loads(f.read_text()))
                out[f.stem] = {int(n["id"]): [max(n["size"][k], (n["min_size"] or n["size"])[k]) for k in (0, 1)]
                               for n in B.node_boxes(pg)}
        finally:
            b.close()
    return out, version


def main(argv=None) -> int:
    from .server import LocalServer, get_json

    ap = argparse.ArgumentParser(prog="python -m scripts.layout_workflows", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path, help="workflows (default: example_workflows/*.json)")
    ap.add_argument("--frontend-path", action="append", default=None,
                    help="also measure with the frontend package in DIR (default: .cache/frontend-latest if present)")
    ap.add_argument("--check", action="store_true", help="report overlaps only, write nothing")
    args = ap.parse_args(argv)
    files = args.files or sorted((REPO / "example_workflows").glob("*.json"))
    fronts = args.frontend_path
    if fronts is None:
        latest = REPO / ".cache" / "frontend-latest"
        fronts = [str(latest)] if (latest / "comfyui_frontend_package").is_dir() else []
    from . import browser as B

    if B.chromium_problem():
        print(B.chromium_problem(), file=sys.stderr)
        return 2
    sizes: dict[str, dict[int, list[float]]] = {}
    info = None
    for fp in [None] + fronts:
        srv = LocalServer(frontend_path=fp or "").start()
        try:
            info = info or get_json(f"{srv.url}/object_info", timeout=60)
            got, version = measure(srv.url, files)
        finally:
            srv.stop()
        print(f"[layout] measured {len(files)} workflows on frontend {version}", file=sys.stderr)
        for stem, d in got.items():
            acc = sizes.setdefault(stem, {})
            for i, s in d.items():
                acc[i] = [max(a, b) for a, b in zip(acc.get(i, [0, 0]), s)]
    for f in files:
        data = json.loads(f.read_text())
        new = layout(data, sizes[f.stem], info)
        if args.check:
            continue
        f.write_text(json.dumps(new, indent=2) + "\n")
        print(f"[layout] {f.relative_to(REPO) if f.is_absolute() else f}: {len(new['nodes'])} nodes, "
              f"groups {[g['title'] for g in new['groups']]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
