"""The ``models/spargeattn`` folder of tuned-threshold files (ComfyUI ``folder_paths`` glue).

Registered on import under the name ``"spargeattn"``, so ``extra_model_paths.yaml`` may add more
folders with that key. Files are listed for the patch node's combo and written by the save node
into the first folder (``models/spargeattn`` unless a yaml made another folder the default).
"""

from __future__ import annotations

import os

import folder_paths

from . import presets

NONE = "none"


def register() -> None:
    """Register ``models/spargeattn`` (idempotent); only ``.safetensors`` files are listed."""
    folder_paths.add_model_folder_path(presets.FOLDER, os.path.join(folder_paths.models_dir, presets.FOLDER))
    extensions = folder_paths.folder_names_and_paths[presets.FOLDER][1]
    if isinstance(extensions, set):
        extensions.add(presets.EXTENSION)


def choices() -> list[str]:
    """``"none"`` followed by the tuned files found in the registered folders."""
    return [NONE] + folder_paths.get_filename_list(presets.FOLDER)


def load(name: str) -> presets.TunedThresholds | None:
    """The thresholds of combo entry ``name`` (None for ``"none"``).

    Raises
    ------
    FileNotFoundError
        The file is not (or no longer) in a registered folder.
    ValueError
        The file is corrupted or not a thresholds file (:func:`.presets.load`).
    """
    if name == NONE:
        return None
    path = folder_paths.get_full_path(presets.FOLDER, name)
    if path is None:
        raise FileNotFoundError(f"SpargeAttn: tuned thresholds {name!r} not found in "
                                f"{folder_paths.get_folder_paths(presets.FOLDER)}; refresh the page (R) and pick a "
                                "file from the list, or choose 'none'")
    return presets.load(path)


def save_folder() -> str:
    """Where the save node writes: the first registered folder."""
    return folder_paths.get_folder_paths(presets.FOLDER)[0]


register()
