"""The pack on the real host: ComfyUI's own custom-node loader imports it, and every node is well-formed for users."""
from __future__ import annotations

import asyncio
import logging
import os

import pytest

from scripts import host


def test_pack_loads_through_comfyuis_custom_node_loader(caplog):
    import folder_paths
    import nodes
    from comfy.cli_args import args

    root = host.comfyui_root()
    link = root / "custom_nodes" / host.PACK_NAME
    assert link.exists(), f"scripts/setup.sh should have linked the pack into {link}"
    args.disable_all_custom_nodes = True
    args.whitelist_custom_nodes = [host.PACK_NAME]
    assert str(root / "custom_nodes") in [os.path.normpath(p) for p in folder_paths.get_folder_paths("custom_nodes")]
    with caplog.at_level(logging.INFO):
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    ours = [line for line in caplog.text.splitlines() if str(link) in line or "personalize" in line.lower()]
    assert not [line for line in ours if "IMPORT FAILED" in line or "Cannot import" in line], "\n".join(ours)
    assert host.PACK_NAME in nodes.LOADED_MODULE_DIRS
    from personalize import NODE_CLASS_MAPPINGS

    assert NODE_CLASS_MAPPINGS, "the pack registers no nodes"
    for name in NODE_CLASS_MAPPINGS:
        assert name in nodes.NODE_CLASS_MAPPINGS, f"{name} not registered by ComfyUI's loader"
        assert nodes.NODE_CLASS_MAPPINGS[name].RELATIVE_PYTHON_MODULE == f"custom_nodes.{host.PACK_NAME}"
    # the pack's model folders exist for users
    for folder in ("bootpig", "subject_diffusion", "sams"):
        assert folder in folder_paths.folder_names_and_paths


def _all_nodes():
    from personalize import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    return [(k, v, NODE_DISPLAY_NAME_MAPPINGS.get(k)) for k, v in sorted(NODE_CLASS_MAPPINGS.items())]


@pytest.mark.parametrize("node_id,cls,display", _all_nodes(), ids=[n[0] for n in _all_nodes()])
def test_node_is_well_formed_for_users(node_id, cls, display):
    assert node_id.startswith("Personalize"), "node ids are prefixed to avoid clashes with other packs"
    assert display and not display.startswith("Personalize"), "a display name that says what the node does"
    assert cls.CATEGORY.startswith("personalize/"), "the pack is grouped under one root category"
    assert callable(getattr(cls, cls.FUNCTION))
    assert getattr(cls, "DESCRIPTION", ""), "a description for the node's help"
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            opts = value[1] if len(value) > 1 else {}
            assert opts.get("tooltip"), f"input '{name}' of {node_id} has no tooltip"
    assert len(cls.RETURN_TYPES) == len(getattr(cls, "OUTPUT_TOOLTIPS", cls.RETURN_TYPES))
