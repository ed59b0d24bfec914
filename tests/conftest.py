"""Test harness: the real ComfyUI host in-process (no stand-ins for comfy.*), tiny seeded-random models in the real
SD1.5/SDXL layouts, and one shared ComfyUI server for server-level tests."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # ComfyUI's sampler progress bars would fill the test log

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from scripts import host  # noqa: E402

host.bootstrap()
sys.path.insert(0, str(REPO / "tests"))


import personalize  # noqa: E402,F401  (the pack, imported as a package through the import-root link)
from scripts import models  # noqa: E402


@pytest.fixture(scope="session")
def pack():
    return personalize


@pytest.fixture(scope="session")
def tiny_sd15():
    return models.build_model("sd15", tiny=True, seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl():
    return models.build_model("sdxl", tiny=True, seed=0)


@pytest.fixture(autouse=True)
def own_weights(request):
    """A test that takes a shared tiny model starts with that model loaded, as every sampling node of a prompt does:
    ComfyUI installs a clone's object and weight patches in the UNet the clones share when that clone loads and
    keeps them until another model loads, so without this a test reading the UNet directly (state dicts, a trainer's
    frozen copy) would see the patches of a clone an earlier test sampled (make test runs files in any order)."""
    import comfy.model_management as mm

    for name in ("tiny_sd15", "tiny_sdxl"):
        if name in request.fixturenames:
            mm.load_models_gpu([request.getfixturevalue(name)], force_full_load=True)


@pytest.fixture(scope="session")
def checkpoint_path():
    from scripts.make_checkpoint import ensure_checkpoint

    return ensure_checkpoint()


@pytest.fixture(scope="session")
def server(checkpoint_path):
    """A real ComfyUI server (subprocess) with the pack installed and the generated checkpoint available."""
    from scripts.server import LocalServer

    srv = LocalServer().start()
    yield srv
    srv.stop()
