"""Finding model folders and reading their cards; the summary shown for a model in the selector."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

from .. import GMSError, modelpaths
from ..card import parse_card
from ..modelcard import FoundationSpec, ModelCard, Segment
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


def _cardJson(folder: str) -> dict:
    """The JSON object in the folder's ``card.json``; ValueError with a clear message when missing or unreadable."""
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


def readModelCard(model: str) -> ModelCard:
    """The model folder's ``card.json`` as a :class:`ModelCard`, checked as the engine checks it on load
    (``card.parse_card``); ValueError with a clear message when missing, unreadable or invalid."""
    folder = resolveModel(model)
    try:
        return parse_card(_cardJson(folder), f"model card {os.path.join(folder, 'card.json')}")
    except GMSError as e:
        raise ValueError(str(e)) from None


@dataclass(frozen=True)
class OpenedModel:
    """A model resolved to its folder, with its card read: what one Segment or Adapt click passes on (to the
    requirement check, the job, and the worker's ``--model FOLDER``), so the card is read once per click."""

    folder: str
    card: ModelCard


def openModel(model: str | OpenedModel | None) -> OpenedModel:
    """``model`` (a folder or an installed name) resolved and its card read, once; an :class:`OpenedModel` as is.
    ValueError when there is no model or its ``card.json`` is missing or not a JSON object. The card's fields are not
    checked here: the worker checks the model (weights first, then the card) and the job reports what it says, as
    ``gms segment`` does."""
    if isinstance(model, OpenedModel):
        return model
    folder = resolveModel(model)
    return OpenedModel(folder, ModelCard.from_dict(_cardJson(folder)))


def headlineMetric(card: ModelCard | dict) -> dict | None:
    """The figure to show a user for a model: the mean Dice of its recorded evaluation on a test list at the model's
    input size (else at native size, else any recorded evaluation), else its validation Dice. Returns ``{"dice",
    "cases", "what"}`` or None when the card records nothing. ``card``: a ModelCard (a dict is read as one)."""
    metrics = ModelCard.coerce(card).metrics
    metrics = metrics if isinstance(metrics, dict) else {}
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


def modelSummary(card: ModelCard | dict, fallbackName: str = "model") -> str:
    """One paragraph for the model selector: what the model segments, in which images, how well (the recorded Dice,
    see :func:`headlineMetric`), what it was adapted from, and the licence of its training data. ``card``: a
    ModelCard (a dict is read as one)."""
    card = ModelCard.coerce(card)
    name = card.name or fallbackName
    segments = ", ".join(str(s.name) for s in card.segments or [] if isinstance(s, Segment)) or "?"
    kinds = {2: "2D images (each slice of a volume on its own)", 3: "volumes, slice by slice"}
    kind = kinds.get(card.dimension, "images")
    description = str(card.description or "").strip().rstrip(".")
    foundation = card.foundation
    foundationName = foundation.name if isinstance(foundation, FoundationSpec) else foundation
    inputSize = card.input_size if card.input_size is not None else "?"
    text = f"{name}: {description}. " if description else f"{name}. "
    text += f"Segments {segments} in {kind}; input {inputSize} px, foundation {foundationName or '?'}."
    metric = headlineMetric(card)
    if metric is not None:
        cases = f", {metric['cases']} cases" if metric["cases"] else ""
        text += f" Dice {metric['dice']:.3f} ({metric['what']}{cases})."
    initFrom = card.training.get("init_from") if isinstance(card.training, dict) else None
    if isinstance(initFrom, dict) and initFrom.get("name"):
        text += f" Adapted from {initFrom['name']}."
    if card.licence:
        text += f" Data licence: {card.licence}."
    return text
