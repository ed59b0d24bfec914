"""Model folders of the pack, registered with ComfyUI's folder_paths (models/bootpig, models/subject_diffusion,
models/sams). Users put trained weights there; ``extra_model_paths.yaml`` entries with the same names work too."""
from __future__ import annotations

import os

FOLDERS = {
    "bootpig": {".safetensors"},
    "subject_diffusion": {".safetensors"},
    "sams": {".pth", ".pt", ".safetensors"},
}


def register() -> None:
    import folder_paths

    for name, exts in FOLDERS.items():
        default = os.path.join(folder_paths.models_dir, name)
        if name in folder_paths.folder_names_and_paths:
            paths, known = folder_paths.folder_names_and_paths[name]
            if default not in paths:
                paths.append(default)
            folder_paths.folder_names_and_paths[name] = (paths, set(known) | exts)
        else:
            folder_paths.folder_names_and_paths[name] = ([default], set(exts))


def list_files(folder: str) -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list(folder)


def full_path(folder: str, name: str) -> str:
    import folder_paths

    from .errors import InputError

    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise InputError(f"{folder}_name", f"a file in models/{folder}/", repr(name))
    return path
