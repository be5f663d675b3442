"""Finding model folders and reading their cards; the summary shown for a model in the selector."""
from __future__ import annotations

import json
import os
from typing import Sequence

from .. import GMSError, modelpaths
from .states import _int


def findModels(searchPaths: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """``(name, folder)`` of every model folder (a folder with ``card.json``) in the search paths, first one wins."""
    return [(name, str(folder)) for name, folder in modelpaths.find_models(searchPaths)]


def resolveModel(model: str, searchPaths: Sequence[str] | None = None) -> str:
    """A model folder path (returned absolute) or the name of a model found by :func:`findModels`."""
    if not model or not str(model).strip():
        raise ValueError("no model selected: choose a model folder")
    try:
        return str(modelpaths.resolve_model_path(model, searchPaths))
    except GMSError as e:
        raise ValueError(str(e)) from None


def readModelCard(model: str) -> dict:
    """The model folder's ``card.json`` (a dict); ValueError with a clear message when missing or invalid."""
    folder = resolveModel(model)
    path = os.path.join(folder, "card.json")
    try:
        with open(path, encoding="utf-8") as f:
            card = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{folder} is not a GMS model folder (card.json is missing)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the model card {path}: {e}") from None
    if not isinstance(card, dict):
        raise ValueError(f"the model card {path} is not a JSON object")
    return card


def headlineMetric(card: dict) -> dict | None:
    """The figure to show a user for a model: the mean Dice of its recorded evaluation on a test list at the model's
    input size (else at native size, else any recorded evaluation), else its validation Dice. Returns ``{"dice",
    "cases", "what"}`` or None when the card records nothing."""
    metrics = card.get("metrics") if isinstance(card.get("metrics"), dict) else {}
    evaluations = [(k, v) for k, v in metrics.items() if k != "validation" and isinstance(v, dict)
                   and isinstance(v.get("segments"), dict) and "no-tta" not in k]

    def rank(item):
        parts = item[0].split("/")
        return ("test" not in parts, "model" not in parts, "native" not in parts)
    for key, value in sorted(evaluations, key=rank):
        segments = value["segments"]
        dice = segments["mean"].get("dice_mean") if isinstance(segments.get("mean"), dict) else None
        if dice is None:
            dices = [v.get("dice_mean") for n, v in segments.items() if isinstance(v, dict) and n != "mean"]
            dices = [float(d) for d in dices if d is not None]
            dice = sum(dices) / len(dices) if dices else None
        if dice is None:
            continue
        data, listName, *rest = key.split("/") + ["", ""]
        where = {"model": "at the input size", "native": "at native size"}.get(rest[0], "")
        what = f"{data} {listName}".strip() + (f", {where}" if where else "")
        return {"dice": float(dice), "cases": _int(value.get("cases"), 0), "what": what}
    validation = metrics.get("validation")
    if isinstance(validation, dict) and validation.get("dice") is not None:
        return {"dice": float(validation["dice"]), "cases": _int(validation.get("cases"), 0),
                "what": "held-out validation cases"}
    return None


def modelSummary(card: dict, fallbackName: str = "model") -> str:
    """One paragraph for the model selector: what the model segments, in which images, how well (the recorded Dice,
    see :func:`headlineMetric`), what it was adapted from, and the licence of its training data."""
    name = card.get("name") or fallbackName
    segments = ", ".join(str(s.get("name")) for s in card.get("segments", []) if isinstance(s, dict)) or "?"
    dimension = card.get("dimension")
    kind = {2: "2D images (each slice of a volume on its own)", 3: "volumes, slice by slice"}.get(dimension, "images")
    description = str(card.get("description") or "").strip().rstrip(".")
    foundation = card.get("foundation", {})
    foundationName = foundation.get("name") if isinstance(foundation, dict) else foundation
    text = f"{name}: {description}. " if description else f"{name}. "
    text += f"Segments {segments} in {kind}; input {card.get('input_size', '?')} px, foundation {foundationName or '?'}."
    metric = headlineMetric(card)
    if metric is not None:
        cases = f", {metric['cases']} cases" if metric["cases"] else ""
        text += f" Dice {metric['dice']:.3f} ({metric['what']}{cases})."
    initFrom = (card.get("training") or {}).get("init_from") if isinstance(card.get("training"), dict) else None
    if isinstance(initFrom, dict) and initFrom.get("name"):
        text += f" Adapted from {initFrom['name']}."
    if card.get("licence"):
        text += f" Data licence: {card['licence']}."
    return text
