"""Shared machinery of the Personalize pack, written once and used by every technique's node file.

- ``errors``     clear input errors that name the input and what was expected
- ``paths``      model folders registered with ComfyUI's ``folder_paths``
- ``introspect`` model family (SD1.5 / SDXL), attention block keys, token grids
- ``weights_io`` safetensors I/O: atomic writes, key checks
- ``attention``  attention hooks and per-step feature banks
"""
