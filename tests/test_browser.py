"""The pack in the real ComfyUI web page: Debian's Chromium driven by Playwright against the pinned server.

For every example workflow: loading it the way a drop does (the frontend's own loadGraphData) shows no missing-node
dialog and no error toast, every pack node is drawn with its widgets, a screenshot is saved under
artifacts/browser/, and the frontend's graphToPrompt equals the headless CLI's conversion. The templates browser lists
the pack's workflows under its name with their thumbnails; every example is laid out left to right without overlap
(bounding boxes read from the page) with its technique grouped; one workflow queued from the page runs and the page
fetches its image. Only frontend features stable across versions are used (scripts/browser.py): the same tests pass
on the pinned frontend and, with PERSONALIZE_FRONTEND_PATH (``make test-frontend-latest``), on the newest one.
"""
from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from scripts import browser as B
from scripts import workflow as wf
from scripts.server import get_json

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts" / "browser"
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))


@pytest.fixture(scope="module")
def browser():
    problem = B.chromium_problem()
    if problem:
        pytest.fail(problem)
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = B.launch(p)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    pg = B.open_page(browser, server.url)
    yield pg
    pg.context.close()


@pytest.fixture(scope="module")
def shared_page(browser, server):
    """One page for the tests that only load workflows (loadGraphData replaces the whole graph)."""
    pg = B.open_page(browser, server.url)
    yield pg
    pg.context.close()


def load_workflow(pg, data):
    B.load_workflow(pg, data)


def visible_problems(pg):
    """Texts of visible dialogs about missing nodes, and of error toasts."""
    return pg.evaluate("""() => {
        const vis = e => !!(e.offsetWidth || e.offsetHeight || e.getClientRects().length);
        const out = [];
        for (const d of document.querySelectorAll('.p-dialog, [role=dialog]'))
            if (vis(d) && /missing|not found|could not/i.test(d.textContent)) out.push('dialog: ' + d.textContent.slice(0, 300));
        for (const t of document.querySelectorAll('.p-toast-message-error, .p-toast-message-warn'))
            if (vis(t)) out.push('toast: ' + t.textContent.slice(0, 300));
        return out;
    }""")


def pack_version(path: Path | None) -> str:
    """The comfyui-frontend-package version installed in ``path`` (a --target folder) or in this venv."""
    from importlib import metadata

    if path is None:
        return metadata.version("comfyui-frontend-package")
    dists = list(path.glob("comfyui_frontend_package-*.dist-info"))
    assert dists, f"no comfyui_frontend_package dist-info in {path}"
    return dists[0].name[len("comfyui_frontend_package-"):-len(".dist-info")]


def test_the_page_runs_the_frontend_asked_for(shared_page, server):
    """The pinned one, or with PERSONALIZE_FRONTEND_PATH (make test-frontend-latest) the one installed there."""
    want = pack_version(server.frontend_path)
    got = B.frontend_version(shared_page)
    (ARTIFACTS / "frontend_version.txt").write_text(got + "\n")
    assert got == want, f"the page runs frontend {got!r}, expected {want!r} ({server.frontend_path or 'pinned'})"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_loads_draws_and_converts_like_the_cli(shared_page, server, path):
    page = shared_page
    page.errors.clear()
    data = json.loads(path.read_text())
    load_workflow(page, data)
    assert visible_problems(page) == []
    drawn = B.node_boxes(page)
    missing = page.evaluate("(types) => types.filter(t => !LiteGraph.registered_node_types[t])",
                            [n["type"] for n in drawn])
    assert missing == [], f"missing node types in {path.name}: {missing}"
    assert len(drawn) == len(data["nodes"])
    info = get_json(f"{server.url}/object_info")
    pack = [n for n in drawn if n["type"].startswith("Personalize")]
    assert pack, f"{path.name} uses no node of the pack"
    for n in pack:
        want = [name for name, _ in wf.widget_inputs(info[n["type"]])]
        assert set(want) <= set(n["widgets"]), f"{n['type']} drawn without widgets {set(want) - set(n['widgets'])}"
        assert n["size"][0] > 0 and n["size"][1] > 0
    page.wait_for_timeout(300)
    page.screenshot(path=str(ARTIFACTS / f"{path.stem}.png"))
    front = page.evaluate("async () => (await app.graphToPrompt()).output")
    ours = wf.ui_to_api(data, info)

    def norm(api):
        return {k: (v["class_type"], json.loads(json.dumps(v["inputs"]))) for k, v in api.items()}

    a, b = norm(front), norm(ours)
    diffs = [f"node {k}: page {a.get(k)} vs cli {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    for k in sorted(set(a) & set(b)):
        if a[k] != b[k] and a[k][0] == b[k][0]:
            ia, ib = a[k][1], b[k][1]
            diffs.append(f"node {k} inputs differing: " + ", ".join(
                f"{n}: page={ia.get(n)!r} cli={ib.get(n)!r}" for n in sorted(set(ia) | set(ib)) if ia.get(n) != ib.get(n)))
    assert not diffs, "\n".join(diffs)
    assert page.errors == [], page.errors


FIX = "lay it out with `python -m scripts.layout_workflows example_workflows/{name}` (see its docstring)"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_is_laid_out_left_to_right_without_overlap_and_grouped(shared_page, server, path):
    """Bounding boxes as the page lays the nodes out (title bars included): no two nodes overlap, every link runs
    left to right, each technique's nodes sit in a group titled with the technique that also holds a note, and no
    other node reaches into a group."""
    from scripts.layout_workflows import TECHNIQUES

    page = shared_page
    data = json.loads(path.read_text())
    load_workflow(page, data)
    nodes = {int(n["id"]): n for n in B.node_boxes(page)}  # newer frontends give ids as strings
    groups = B.group_boxes(page)
    fix = FIX.format(name=path.name)
    bad = [f"{B.describe(a)} overlaps {B.describe(b)}" for a, b in B.overlaps(list(nodes.values()))]
    assert not bad, f"{path.name}: overlapping nodes in the page:\n  " + "\n  ".join(bad) + f"\n{fix}"
    backwards = []
    for link in data["links"]:
        src, dst = nodes[int(link[1])], nodes[int(link[3])]
        if src["box"][0] + src["box"][2] > dst["box"][0]:
            backwards.append(f"{B.describe(src)} -> {B.describe(dst)}")
    assert not backwards, f"{path.name}: links that do not run left to right:\n  " + "\n  ".join(backwards) + \
        f"\n{fix}"
    info = get_json(f"{server.url}/object_info")
    by_title = {g["title"]: g for g in groups}
    problems = []
    inside: dict[str, list[dict]] = {g["title"]: [] for g in groups}
    for n in nodes.values():
        for g in groups:
            if B.contains(g["box"], n["box"]):
                inside[g["title"]].append(n)
            elif B.intersects(g["box"], n["box"]):
                problems.append(f"{B.describe(n)} reaches into group '{g['title']}'")
    for n in nodes.values():
        cat = (info.get(n["type"]) or {}).get("category", "")
        if cat in TECHNIQUES:
            title = TECHNIQUES[cat][0]
            if title not in by_title or n not in inside[title]:
                problems.append(f"{B.describe(n)} is not inside a group titled '{title}'")
    for title, members in inside.items():
        if not any(m["type"] in ("Note", "MarkdownNote") for m in members):
            problems.append(f"group '{title}' holds no note")
        if not any(m["type"].startswith("Personalize") for m in members):
            problems.append(f"group '{title}' holds no node of the pack")
    for i, g in enumerate(groups):
        for h in groups[i + 1:]:
            if B.intersects(g["box"], h["box"]):
                problems.append(f"groups '{g['title']}' and '{h['title']}' overlap")
    assert groups and not problems, f"{path.name}: " + ("; ".join(problems) or "no group") + f"\n{fix}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_every_template_has_its_thumbnail(server, path):
    """ComfyUI's template browser shows <name>.jpg next to <name>.json: a small JPEG, served by the server."""
    from PIL import Image

    jpg = path.with_suffix(".jpg")
    assert jpg.is_file(), (f"{path.name} has no thumbnail {jpg.name}: render it with "
                           f"`python -m scripts.thumbnails example_workflows/{path.name}`")
    with Image.open(jpg) as im:
        assert im.format == "JPEG" and min(im.size) >= 64, (im.format, im.size)
    assert jpg.stat().st_size < 100_000, f"{jpg.name} is {jpg.stat().st_size} bytes: keep thumbnails small"
    with urllib.request.urlopen(f"{server.url}/api/workflow_templates/personalize/{jpg.name}", timeout=30) as r:
        assert r.status == 200 and r.read() == jpg.read_bytes()


def test_templates_browser_lists_the_pack_under_its_name_with_thumbnails(page, server):
    listed = get_json(f"{server.url}/api/workflow_templates")
    assert sorted(listed.get("personalize", [])) == sorted(p.stem for p in WORKFLOWS)
    fetched = []
    page.on("response", lambda r: fetched.append((r.url, r.status)) if ".jpg" in r.url else None)
    page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.get_by_text("personalize", exact=True).first.click(timeout=30_000)
    for p in WORKFLOWS:   # the grid loads thumbnails lazily: bring each card into view
        card = page.get_by_text(p.stem, exact=True).first
        card.wait_for(timeout=30_000)
        card.scroll_into_view_if_needed(timeout=30_000)
        page.wait_for_timeout(300)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(ARTIFACTS / "templates_browser.png"))
    shown = {url.rsplit("/", 1)[-1].split("?")[0] for url, status in fetched if status == 200}
    missing = [p.stem for p in WORKFLOWS if f"{p.stem}.jpg" not in shown]
    assert not missing, f"the template browser fetched no thumbnail for {missing} (fetched: {sorted(shown)})"


def test_queue_from_the_page_runs_and_shows_the_image(page, server):
    """Queued from the page (app.queuePrompt), the toy world's text-to-image runs; the result is read from the
    server's /history and the page fetches the saved image to show it (/view): no sidebar or panel internals."""
    data = json.loads((REPO / "example_workflows" / "toyworld_txt2img.json").read_text())
    load_workflow(page, data)
    page.evaluate("""() => {  // a short run: one image, 6 steps (widget values, as a user would set them)
        const set = (type, name, v) => { for (const n of (app.graph.nodes || app.graph._nodes).filter(n => n.type === type))
            n.widgets.find(w => w.name === name).value = v; };
        set('EmptyLatentImage', 'batch_size', 1); set('KSampler', 'steps', 6);
    }""")
    viewed = []
    page.on("request", lambda r: viewed.append(r.url) if "/view?" in r.url else None)
    before = set(get_json(f"{server.url}/history"))
    page.evaluate("async () => { await app.queuePrompt(0, 1) }")
    deadline, entry = time.time() + 600, None
    while time.time() < deadline:
        new = {k: v for k, v in get_json(f"{server.url}/history").items() if k not in before}
        done = [v for v in new.values() if v.get("status", {}).get("completed") is not None]
        if done:
            entry = done[0]
            break
        time.sleep(1)
    assert entry is not None, server.log_tail()
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = [i for out in entry["outputs"].values() for i in out.get("images", [])]
    assert images and images[0]["filename"].startswith("toyworld")
    name = images[0]["filename"]
    deadline = time.time() + 60
    while time.time() < deadline and not any(f"filename={name}" in u for u in viewed):
        page.wait_for_timeout(250)
    assert any(f"filename={name}" in u for u in viewed), f"the page never fetched {name}; it fetched {viewed}"
    page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / "queued_from_page.png"))
