"""Registry hygiene (issue 17): the license the pyproject declares, the repository URL and icon, requirements that
match what the code imports, and segment-anything optional (the pack imports without it; the SAM nodes say how to
install it)."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SKIP_DIRS = {".venv", ".comfyui", ".cache", "output", "artifacts", ".git", "__pycache__"}


def pack_sources():
    for p in REPO.rglob("*.py"):
        if not SKIP_DIRS & set(p.relative_to(REPO).parts):
            yield p


def imported_top_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out


def requirement_names(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def test_license_file_is_the_apache_2_text_the_pyproject_declares():
    assert PYPROJECT["project"]["license"] == {"file": "LICENSE"}
    text = (REPO / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text
    assert len(text.split()) > 1500  # the full text, not a stub
    assert "License :: OSI Approved :: Apache Software License" in PYPROJECT["project"]["classifiers"]


def test_repository_url_and_icon():
    repo = PYPROJECT["project"]["urls"]["Repository"]
    assert repo.startswith("https://")
    icon = PYPROJECT["tool"]["comfy"]["Icon"]
    assert icon.startswith("https://") and icon.endswith("/icon.svg")
    svg = ET.parse(REPO / "icon.svg").getroot()
    assert svg.tag.endswith("svg")
    w, h = float(svg.get("width")), float(svg.get("height"))
    assert 0 < w <= 800 and 0 < h <= 400  # the registry's limit
    assert (REPO / "icon.svg").stat().st_size < 10_000


def test_requirements_match_the_imports():
    reqs = requirement_names(REPO / "requirements.txt")
    assert sorted(reqs) == sorted(PYPROJECT["project"]["dependencies"])
    assert "torch" not in reqs
    imported = set().union(*(imported_top_modules(p) for p in pack_sources()))
    assert "einops" not in imported and "einops" not in reqs
    module_of = {"safetensors": "safetensors", "numpy": "numpy"}
    for r in reqs:
        assert module_of.get(r, r) in imported, f"{r} is required but never imported"
    assert "segment-anything" not in reqs
    assert PYPROJECT["project"]["optional-dependencies"]["sam"] == ["segment-anything"]
    # the tests use it, so the test set-up installs it
    assert "segment-anything" in requirement_names(REPO / "requirements-dev.txt")


def test_segment_anything_is_imported_lazily_only_in_nodes_sam():
    """A top-level import anywhere would make the pack fail to load without it."""
    for p in pack_sources():
        tree = ast.parse(p.read_text(), str(p))
        for node in tree.body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.startswith("segment_anything")], f"{p.name}: top-level import"


WITHOUT_SAM = r"""
import json, sys, tempfile
sys.modules["segment_anything"] = None          # as if it were not installed: every import of it fails
sys.path.insert(0, sys.argv[1])
from scripts import host
host.bootstrap()
import torch
import personalize
m = personalize.NODE_CLASS_MAPPINGS
out = {"nodes": len(m), "has_sam_nodes": "PersonalizeSAMLoader" in m and "PersonalizeSubjectMaskSAM" in m}
f = tempfile.NamedTemporaryFile(suffix=".pth", delete=False); f.write(b"not read"); f.close()
for name, call in (("loader", lambda: m["PersonalizeSAMLoader"]().load(f.name)),
                   ("mask", lambda: m["PersonalizeSubjectMaskSAM"]().segment(object(), torch.zeros(1, 8, 8, 3)))):
    try:
        call()
        out[name] = None
    except Exception as e:
        out[name] = [type(e).__name__, isinstance(e, ImportError), str(e)]
print("RESULT " + json.dumps(out))
"""


def test_pack_imports_without_segment_anything_and_sam_nodes_say_how_to_install_it():
    r = subprocess.run([sys.executable, "-c", WITHOUT_SAM, str(REPO)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=""))
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["has_sam_nodes"] and out["nodes"] > 10
    for name in ("loader", "mask"):
        kind, is_import_error, msg = out[name]
        assert kind == "SegmentAnythingMissing" and is_import_error, out[name]
        assert "segment-anything" in msg and "pip install segment-anything" in msg and "rest of the pack" in msg
