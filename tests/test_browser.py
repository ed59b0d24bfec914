"""The pack in the real ComfyUI web page: Debian's Chromium driven by Playwright against the pinned server.

For every example workflow: loading it the way a drop does (the frontend's own loadGraphData) shows no missing-node
dialog and no error toast, every pack node is drawn with its widgets, a screenshot is saved under
artifacts/browser/, and the frontend's graphToPrompt equals the headless CLI's conversion. The templates browser lists
the pack's workflows under its name, and one workflow queued from the page runs and shows its image in the queue.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from scripts import workflow as wf
from scripts.server import get_json

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts" / "browser"
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
CHROMIUM = os.environ.get("PERSONALIZE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM):
        pytest.fail(f"Chromium is not installed at {CHROMIUM}: the browser tests need it (scripts/setup.sh installs "
                    "Debian's chromium with apt-get; set PERSONALIZE_CHROMIUM to another binary)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the Python package playwright is missing: run `make setup` (requirements-dev.txt)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    # a returning user: no first-run template dialog
    req = urllib.request.Request(f"{server.url}/settings/Comfy.TutorialCompleted", data=b"true", method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).read()
    ctx = browser.new_context(viewport={"width": 1920, "height": 1080}, user_agent="personalize-tests")
    pg = ctx.new_page()
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.goto(server.url, wait_until="load")
    pg.wait_for_function("() => window.app && window.app.graph && window.LiteGraph && "
                         "Object.keys(window.LiteGraph.registered_node_types).length > 100", timeout=120_000)
    yield pg
    ctx.close()


def load_workflow(pg, data):
    pg.evaluate("async (wf) => { await window.app.loadGraphData(wf) }", data)
    pg.wait_for_timeout(800)


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


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_loads_draws_and_converts_like_the_cli(page, server, path):
    data = json.loads(path.read_text())
    load_workflow(page, data)
    assert visible_problems(page) == []
    missing = page.evaluate("() => app.graph._nodes.filter(n => !LiteGraph.registered_node_types[n.type])"
                            ".map(n => n.type)")
    assert missing == [], f"missing node types in {path.name}: {missing}"
    drawn = page.evaluate("() => app.graph._nodes.map(n => ({id: n.id, type: n.type, "
                          "widgets: (n.widgets || []).map(w => w.name), size: n.size}))")
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


def test_templates_browser_lists_the_pack_under_its_name(page, server):
    listed = get_json(f"{server.url}/api/workflow_templates")
    assert sorted(listed.get("personalize", [])) == sorted(p.stem for p in WORKFLOWS)
    page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.get_by_text("personalize", exact=True).first.click(timeout=30_000)
    for p in WORKFLOWS:
        page.get_by_text(p.stem, exact=True).first.wait_for(timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "templates_browser.png"))


def test_queue_from_the_page_runs_and_shows_the_image(page, server):
    data = json.loads((REPO / "example_workflows" / "bootpig_reference.json").read_text())
    load_workflow(page, data)
    page.evaluate("""() => {
        const set = (type, name, v) => { for (const n of app.graph._nodes.filter(n => n.type === type))
            n.widgets.find(w => w.name === name).value = v; };
        set('EmptyLatentImage', 'width', 64); set('EmptyLatentImage', 'height', 64);
        set('KSampler', 'steps', 2); set('PersonalizeBootPIGReferenceEncoder', 'resolution', 64);
    }""")
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
    assert images and images[0]["filename"].startswith("personalize_bootpig")
    # the page received the result: the SaveImage node's output and the queue panel show the image
    page.wait_for_function("() => app.nodeOutputs && Object.values(app.nodeOutputs).some(o => o.images && "
                           "o.images.some(i => i.filename.startsWith('personalize_bootpig')))", timeout=60_000)
    page.evaluate("() => app.extensionManager.command.execute('Workspace.ToggleSidebarTab.queue')")
    page.wait_for_selector(f"img[src*='{images[0]['filename']}']", timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "queued_from_page.png"))
