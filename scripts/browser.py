"""The real ComfyUI page in Debian's Chromium (Playwright), for the browser tests and scripts/layout_workflows.py.

Only what is stable across frontend versions is used: ``window.app`` (``loadGraphData``, ``graphToPrompt``,
``queuePrompt``, ``graph``), LiteGraph's node fields (``id``, ``type``, ``pos``, ``size``, ``title``, ``widgets``,
``getBounding``, ``computeSize``) and groups (``title``, ``pos``, ``size``), the server's HTTP routes and the page's
network requests. Frontend commands, sidebar tabs and CSS classes of panels change between versions and are avoided.
"""
from __future__ import annotations

import json
import os
import shutil
import urllib.request

CHROMIUM = os.environ.get("PERSONALIZE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1920, "height": 1080}


def chromium_problem() -> str | None:
    """None when Chromium and Playwright are usable, else what is missing and how to get it."""
    if not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM):
        return (f"Chromium is not installed at {CHROMIUM}: the browser tests need it (scripts/setup.sh installs "
                "Debian's chromium with apt-get; set PERSONALIZE_CHROMIUM to another binary)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python package playwright is missing: run `make setup` (requirements-dev.txt)"
    return None


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def open_page(browser, url: str):
    """A page on the ComfyUI at ``url``, as a returning user (no first-run template dialog), with the app ready.
    ``page.errors`` collects uncaught page errors."""
    req = urllib.request.Request(f"{url}/settings/Comfy.TutorialCompleted", data=b"true", method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).read()
    ctx = browser.new_context(viewport=VIEWPORT, user_agent="personalize-tests")
    pg = ctx.new_page()
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.goto(url, wait_until="load")
    pg.wait_for_function("() => window.app && window.app.graph && window.LiteGraph && "
                         "Object.keys(window.LiteGraph.registered_node_types).length > 100", timeout=120_000)
    return pg


def frontend_version(pg) -> str:
    return pg.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || ''")


def load_workflow(pg, data: dict, settle_ms: int = 800) -> None:
    """Load a UI-format workflow the way a drop does (the frontend's own loadGraphData)."""
    pg.evaluate("async (wf) => { await window.app.loadGraphData(wf) }", json.loads(json.dumps(data)))
    pg.wait_for_timeout(settle_ms)
    pg.evaluate("() => { const c = window.app.canvas; if (c && c.draw) c.draw(true, true) }")
    pg.wait_for_timeout(100)


NODES_JS = """() => {
    const g = window.app.graph;
    const nodes = g.nodes || g._nodes;
    const title = LiteGraph.NODE_TITLE_HEIGHT || 30;
    return nodes.map(n => {
        let b = null;
        if (typeof n.getBounding === 'function') { try { b = Array.from(n.getBounding()); } catch (e) { b = null; } }
        if (!b || b.length < 4 || b.some(v => !Number.isFinite(v)))
            b = [n.pos[0], n.pos[1] - title, n.size[0], n.size[1] + title];
        let min = null;
        if (typeof n.computeSize === 'function') { try { min = Array.from(n.computeSize()); } catch (e) { min = null; } }
        return {id: n.id, type: n.type, title: n.title, pos: Array.from(n.pos), size: Array.from(n.size),
                box: b.slice(0, 4), min_size: min, mode: n.mode,
                widgets: (n.widgets || []).map(w => w.name)};
    });
}"""

GROUPS_JS = """() => {
    const g = window.app.graph;
    const groups = g.groups || g._groups || [];
    return groups.map(gr => {
        const b = gr._bounding || gr.bounding || [gr.pos[0], gr.pos[1], gr.size[0], gr.size[1]];
        return {title: gr.title, box: Array.from(b).slice(0, 4)};
    });
}"""


def node_boxes(pg) -> list[dict]:
    """Every node of the loaded graph: id, type, title, pos, size, box = [x, y, w, h] as the page lays it out (the
    title bar included), the frontend's minimum size for it, its mode and widget names."""
    return pg.evaluate(NODES_JS)


def group_boxes(pg) -> list[dict]:
    return pg.evaluate(GROUPS_JS)


def intersects(a, b, margin: float = 0.0) -> bool:
    """Boxes [x, y, w, h] overlap (touching edges do not count)."""
    return (a[0] < b[0] + b[2] - margin and b[0] < a[0] + a[2] - margin and
            a[1] < b[1] + b[3] - margin and b[1] < a[1] + a[3] - margin)


def contains(outer, inner) -> bool:
    return (outer[0] <= inner[0] and outer[1] <= inner[1] and inner[0] + inner[2] <= outer[0] + outer[2] and
            inner[1] + inner[3] <= outer[1] + outer[3])


def overlaps(nodes: list[dict]) -> list[tuple[dict, dict]]:
    out = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            if intersects(a["box"], b["box"]):
                out.append((a, b))
    return out


def describe(n: dict) -> str:
    t = f" '{n['title']}'" if n.get("title") and n["title"] != n["type"] else ""
    x, y, w, h = (round(v) for v in n["box"])
    return f"node {n['id']} {n['type']}{t} at [{x}, {y}, {w}x{h}]"
