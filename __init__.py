"""Personalize: subject-driven image generation for ComfyUI (BootPIG, Subject-Diffusion, Pick-and-Draw, DreamBooth).

Install: ``git clone`` this repository into ``ComfyUI/custom_nodes/`` and restart ComfyUI.
"""
from .nodes import paths as _paths

_paths.register()

import importlib  # noqa: E402
import importlib.util  # noqa: E402

# One file of thin node classes per technique; the machinery they share lives in nodes/.
_TECHNIQUES = ("bootpig_nodes", "pick_and_draw_nodes", "dreambooth_nodes", "subject_diffusion_nodes", "toy_world_nodes")

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _name in _TECHNIQUES:
    if importlib.util.find_spec(f".{_name}", __name__) is None:
        continue
    _module = importlib.import_module(f".{_name}", __name__)
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

# one validation layer for every registered node: inputs are checked against the node's own INPUT_TYPES (finite
# numbers inside min/max, finite images/masks/latents) before the node body runs
from .nodes import validation as _validation  # noqa: E402

_validation.install(NODE_CLASS_MAPPINGS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
