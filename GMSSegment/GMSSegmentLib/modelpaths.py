"""Finding model folders by path or name, without importing torch (the Slicer side uses this before PyTorch is
installed). Search order for names: ``$GMS_MODELS_DIR`` (os.pathsep-separated), the installed module's
``Resources/Models``, then the source tree's ``GMSSegment/Resources/Models``."""
from __future__ import annotations

import os
from pathlib import Path

from . import GMSError

CARD = "card.json"
DEFAULT_MODEL = "busi-lesion"
BUNDLED_MODELS_DIR = Path(__file__).resolve().parent.parent / "Resources" / "Models"


def model_search_paths() -> list[Path]:
    env = os.environ.get("GMS_MODELS_DIR", "")
    return [Path(p) for p in env.split(os.pathsep) if p] + [BUNDLED_MODELS_DIR]


def find_models(search_paths=None) -> list[tuple[str, Path]]:
    """(name, folder) of every folder with a card.json in the search paths; the first one of a name wins."""
    found: dict[str, Path] = {}
    for base in search_paths if search_paths is not None else model_search_paths():
        base = Path(base)
        if not base.is_dir():
            continue
        for entry in sorted(base.iterdir()):
            if (entry / CARD).is_file() and entry.name not in found:
                found[entry.name] = entry.resolve()
    return list(found.items())


def resolve_model_path(name_or_path, search_paths=None) -> Path:
    """A model folder path, or the name of an installed/bundled model (default: busi-lesion)."""
    value = str(name_or_path or DEFAULT_MODEL).strip()
    p = Path(value).expanduser()
    if p.is_dir():
        return p.resolve()
    for name, folder in find_models(search_paths):
        if name == value:
            return folder
    known = ", ".join(n for n, _ in find_models(search_paths)) or "none"
    raise GMSError(f"model not found: '{value}' is neither a folder nor an installed model (installed: {known})")
