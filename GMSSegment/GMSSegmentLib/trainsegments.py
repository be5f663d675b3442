"""The segments a training run learns, and their check against the data's masks, before anything is encoded.

``gms train`` names the segments with ``--segments`` and their values in the mask files with ``--label-values``.
Adapting a model (``--init-from``), what is not given is inherited from the model it starts from: its segments' names,
colours, code colours and output label values, and the mask values it was trained on (its card's
``training.label_values``), so that an adaptation of ``kvasir-polyp`` still segments a ``polyp``. Names given for as
many segments as the model has keep its colours and code colours; another number of segments starts afresh.

The masks of the training and validation cases are then read once and must agree with the segments: every segment's
value occurs in some mask (a binary 2D segment, value 255, is any value above 127, as the loader reads it), and a
mask value no segment claims is an error unless ``--label-values`` were given, which is how a subset of a data set's
labels is trained on purpose. A mismatch is a one-line error naming the values found and expected.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

from . import GMSError
from .data import volume_path
from .model import code_colours, make_segments
from .modelcard import ModelCard

DEFAULT_NAMES = ["lesion"]


@dataclass(frozen=True)
class TrainingSegments:
    segments: list[dict]  # as in the card: name, label (the value in the output), color, code
    label_values: list[int]  # each segment's value in the data's mask files
    origin: str  # where the segments and their values come from, for messages
    values_given: bool  # --label-values given: training on some of the data's labels is meant

    @property
    def names(self) -> list[str]:
        return [s["name"] for s in self.segments]


def default_label_values(layout: str, n: int) -> list[int]:
    """2D: 255 for one segment (binary masks), else 1..n; 3D: 1..n."""
    return [255] if layout == "2d" and n == 1 else list(range(1, n + 1))


def training_segments(names: list[str] | None, label_values: list[int] | None, layout: str,
                      base_card: ModelCard | dict | None = None) -> TrainingSegments:
    """The segments of a training run from the names and mask values given (None: not given) and, adapting a model,
    its (checked) card."""
    base_card = ModelCard.coerce(base_card) if base_card else None
    base = base_card.segments if base_card else None
    names = list(names) if names else [s.name for s in base] if base else list(DEFAULT_NAMES)
    n = len(names)
    if len(set(names)) != n:
        raise GMSError(f"segment names must differ, got {names}")
    inherit = base is not None and len(base) == n
    origin = f"the --init-from model '{base_card.name}'" if inherit else "--segments and their default values"
    values_given = label_values is not None
    if not values_given:
        learned = base_card.trained_label_values if inherit else None
        if learned and len(learned) == n:
            label_values = list(learned)
        elif inherit and base_card.dimension == 3:
            label_values = base_card.label_values
        else:
            label_values = default_label_values(layout, n)
    else:
        origin = "--label-values"
    if len(label_values) != n:
        raise GMSError(f"{n} segment names but {len(label_values)} label values")
    if len(set(label_values)) != n or not all(1 <= v <= 65535 for v in label_values):
        raise GMSError(f"label values must differ and lie in 1..65535, got {label_values}")
    if inherit:
        segments = make_segments(names, labels=[s.label for s in base], colours=[s.color for s in base])
        for s, b in zip(segments, base):
            s["code"] = list(b.code)  # the colours the model's starting weights draw each segment in
            term = b.extra.get("terminology")
            if term is not None and s["name"] == b.name:  # what the segment is (codes), where it is the same one
                s["terminology"] = term
    else:
        code_colours(n)  # at most as many segments as there are code colours
        segments = make_segments(names)
    if layout == "3d":  # a volume's output keeps the data set's label values
        for s, v in zip(segments, label_values):
            s["label"] = int(v)
    if layout == "2d" and any(s["label"] > 255 for s in segments):
        raise GMSError("a 2D model's output labels are 8-bit: at most 255")
    return TrainingSegments(segments, [int(v) for v in label_values], origin, values_given)


def _read_mask(root: Path, layout: str, case: str) -> np.ndarray:
    try:
        if layout == "2d":
            with Image.open(root / "masks" / f"{case}.png") as im:  # read as data.load_mask reads it
                return np.asarray(im.convert("L"))
        return sitk.GetArrayFromImage(sitk.ReadImage(str(volume_path(root, "labelsTr", case))))
    except GMSError:
        raise
    except Exception as e:  # OSError, PIL's UnidentifiedImageError, ITK's RuntimeError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise GMSError(f"cannot read the mask of case '{case}' in {root}: {first}") from None


def mask_values(root: Path, layout: str, cases: list[str]) -> Counter:
    """How many of the cases' masks hold each non-zero value."""
    found: Counter = Counter()
    for case in cases:
        found.update(int(v) for v in np.unique(_read_mask(root, layout, case)) if v)
    return found


def check_negatives(root: Path, layout: str, list_name: str, cases: list[str]) -> None:
    """Refuse a list of cases 'without any segment' whose masks hold segment pixels (a wrong list would teach the
    model to miss what it should find)."""
    for case in cases:
        held = sorted(int(v) for v in np.unique(_read_mask(root, layout, case)) if v)
        if held:
            raise GMSError(f"case '{case}' of the list '{list_name}' (cases without any segment, --negatives) has "
                           f"mask values {held} in {root}; give a list whose masks are empty")


def check_against_masks(chosen: TrainingSegments, root: Path, layout: str, cases: list[str]) -> None:
    """Refuse segments that do not match the masks of ``cases`` (see the module docstring)."""
    found = mask_values(root, layout, cases)
    values = chosen.label_values
    held = "{" + ", ".join(map(str, sorted(found))) + "}" if found else "only 0"
    where = f"the {len(cases)} masks of the training and validation cases in {root}"
    hint = "give --segments and --label-values to match the data"
    if layout == "2d" and values == [255]:
        if not any(v > 127 for v in found):
            raise GMSError(f"segment '{chosen.names[0]}' (binary: mask values above 127, from {chosen.origin}) "
                           f"occurs in none of {where}: they hold {held}; {hint}")
        return
    for s, v in zip(chosen.segments, values):
        if v not in found:
            raise GMSError(f"segment '{s['name']}' (mask value {v}, from {chosen.origin}) occurs in none of {where}: "
                           f"they hold {held}; {hint}")
    extra = sorted(set(found) - set(values))
    if extra and not chosen.values_given:
        raise GMSError(f"{where} hold values {extra} that no segment has (segments "
                       f"{', '.join(f'{s} = {v}' for s, v in zip(chosen.names, values))}, from {chosen.origin}); "
                       f"{hint}, or --label-values alone to train on some of the labels")
