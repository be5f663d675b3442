"""The model card (``card.json``): read and checked in this one place, once, when a model folder is loaded.

The result is a typed :class:`~.modelcard.ModelCard`. Every field the engine reads is checked for its type and range
here, so that a broken or hostile card is refused with one line naming the field (``model card <path>: 'segments[0].label' must be ...``) instead of a traceback deep in
inference, or a result: an empty segment list used to segment nothing and write an empty mask. Fields the engine only
shows (description, licence, citation, metrics) are checked for their JSON type. Keys the engine does not know are
kept as they are. No torch here: the Slicer side can check a card before PyTorch is installed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from . import GMSError
from .modelcard import ModelCard
from .orientation import check_code
from .terminology import is_code

FORMAT_VERSION = 1
#: the fields a card cannot do without
REQUIRED = ("segments", "input_size", "foundation", "lmm", "normalization")
NORMALIZATION_MODES = ("photo", "percentile", "window")
MAX_INPUT_SIZE = 4096
MAX_CHANNELS = 1024


class _Invalid(Exception):
    """A field that fails its check: (field path, what it must be, the value found)."""


def _show(value) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _require(ok: bool, field: str, expected: str, value) -> None:
    if not ok:
        raise _Invalid(field, expected, value)


def _is_int(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_number(v, lo: float = -math.inf, hi: float = math.inf) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi


def _int(d: dict, key: str, field: str, lo: int, hi: int, optional: bool = True, none_ok: bool = False) -> None:
    if key not in d and optional:
        return
    v = d.get(key)
    _require(_is_int(v, lo, hi) or (none_ok and v is None), field, f"an integer from {lo} to {hi}", v)


def _text(d: dict, key: str, field: str, none_ok: bool = True) -> None:
    if key in d:
        v = d[key]
        _require(isinstance(v, str) or (none_ok and v is None), field, "a string", v)


def _object(d: dict, key: str, field: str, optional: bool = True) -> dict | None:
    if key not in d and optional:
        return None
    v = d.get(key)
    _require(isinstance(v, dict) or (optional and v is None), field, "an object", v)
    return v


def _rgb(v, field: str) -> tuple:
    _require(isinstance(v, list) and len(v) == 3 and all(_is_number(c, 0.0, 1.0) for c in v), field,
             "3 numbers from 0 to 1", v)
    return tuple(float(c) for c in v)


def _check_segments(segments) -> None:
    _require(isinstance(segments, list) and len(segments) > 0, "segments", "a non-empty list of segments", segments)
    names, labels, codes = set(), set(), set()
    for i, s in enumerate(segments):
        f = f"segments[{i}]"
        _require(isinstance(s, dict), f, "an object with name, label, color and code", s)
        name = s.get("name")
        _require(isinstance(name, str) and name.strip() != "", f + ".name", "a non-empty string", name)
        _require(name not in names, f + ".name", "unique among the segments", name)
        _int(s, "label", f + ".label", 1, 255, optional=False)
        _require(s["label"] not in labels, f + ".label", "unique among the segments", s["label"])
        _rgb(s.get("color"), f + ".color")
        code = _rgb(s.get("code"), f + ".code")
        _require(any(code), f + ".code", "a colour other than black (the background)", s["code"])
        _require(code not in codes, f + ".code", "unique among the segments", s["code"])
        if "terminology" in s:
            term = s["terminology"]
            _require(isinstance(term, dict) and is_code(term.get("category")) and is_code(term.get("type"))
                     and ("modifier" not in term or is_code(term["modifier"])), f + ".terminology",
                     'an object {"category": [scheme, value, meaning], "type": [...]} of non-empty strings', term)
        names.add(name)
        labels.add(s["label"])
        codes.add(code)


def _check_foundation(fnd) -> None:
    _require(isinstance(fnd, dict), "foundation", "an object with a 'name'", fnd)
    name = fnd.get("name")
    _require(isinstance(name, str) and name.strip() != "", "foundation.name", "a non-empty string", name)
    for key in ("path", "subfolder", "revision"):
        _text(fnd, key, f"foundation.{key}")
    for key in ("latent_channels", "downscale"):
        _int(fnd, key, f"foundation.{key}", 1, MAX_CHANNELS)
    files = _object(fnd, "files", "foundation.files")
    for fname, digest in (files or {}).items():
        _require(isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest),
                 f"foundation.files.{fname}", "a SHA-256 in hex", digest)


def _check_normalization(norm) -> None:
    _require(isinstance(norm, dict), "normalization", "an object with a 'mode'", norm)
    mode = norm.get("mode", "photo")
    _require(mode in NORMALIZATION_MODES, "normalization.mode", " or ".join(NORMALIZATION_MODES), mode)
    if mode == "percentile":
        for key in ("low", "high"):
            if key in norm:
                _require(_is_number(norm[key], 0, 100), f"normalization.{key}", "a percentile from 0 to 100",
                         norm[key])
        _require(norm.get("low", 0.5) < norm.get("high", 99.5), "normalization.low", "below 'high'", norm.get("low"))
    elif mode == "window":
        _require(_is_number(norm.get("center")), "normalization.center", "a number", norm.get("center"))
        _require(_is_number(norm.get("width"), 0) and norm["width"] > 0, "normalization.width", "a positive number",
                 norm.get("width"))


def _check_lmm(lmm) -> None:
    _require(isinstance(lmm, dict), "lmm", "an object", lmm)
    for key in ("latent_channels", "stem_channels", "groups"):
        _int(lmm, key, f"lmm.{key}", 1, MAX_CHANNELS, optional=False)
    enc = lmm.get("encoder_channels")
    _require(isinstance(enc, list) and 1 <= len(enc) <= 8 and all(_is_int(c, 1, MAX_CHANNELS) for c in enc),
             "lmm.encoder_channels", f"a list of 1 to 8 channel counts from 1 to {MAX_CHANNELS}", enc)
    g = lmm["groups"]
    _require(all(c % g == 0 for c in [lmm["stem_channels"], *enc]), "lmm.groups",
             "a divisor of stem_channels and of every encoder_channels entry", g)
    _require(isinstance(lmm.get("attention"), bool), "lmm.attention", "true or false", lmm.get("attention"))


def _check_options(card: dict) -> None:
    tta = _object(card, "tta", "tta")
    if tta:
        if "views" in tta:
            _require(tta["views"] in (1, 2, 4, 8) and not isinstance(tta["views"], bool), "tta.views",
                     "1, 2, 4 or 8", tta["views"])
        if tta.get("scales") is not None:
            sc = tta["scales"]
            _require(isinstance(sc, list) and 1 <= len(sc) <= 4
                     and all(_is_int(s, 8, MAX_INPUT_SIZE) and s % 8 == 0 for s in sc), "tta.scales",
                     f"a list of 1 to 4 input sizes (multiples of 8 up to {MAX_INPUT_SIZE})", sc)
    pp = _object(card, "postprocess", "postprocess")
    if pp:
        if "largest_component" in pp:
            _require(isinstance(pp["largest_component"], bool), "postprocess.largest_component", "true or false",
                     pp["largest_component"])
        if "z_smooth" in pp:
            _require(_is_number(pp["z_smooth"], 0.0, 0.5), "postprocess.z_smooth", "a number from 0 to 0.5",
                     pp["z_smooth"])
    presence = _object(card, "presence", "presence")
    if presence:
        for key in ("min_area", "min_confidence"):
            if key in presence:
                _require(_is_number(presence[key], 0.0, 1.0), f"presence.{key}", "a number from 0 to 1",
                         presence[key])
    unc = _object(card, "uncertainty", "uncertainty")
    if unc and "temperature" in unc:
        _require(_is_number(unc["temperature"], 0.01, 10.0), "uncertainty.temperature", "a number from 0.01 to 10",
                 unc["temperature"])
    if unc and "boundary_sigma" in unc:
        _require(_is_number(unc["boundary_sigma"], 0.0, 64.0), "uncertainty.boundary_sigma", "a number from 0 to 64",
                 unc["boundary_sigma"])


def _check_precision(card: dict) -> None:
    prec = _object(card, "precision", "precision")
    if prec and "cpu_bf16" in prec:
        _require(isinstance(prec["cpu_bf16"], bool), "precision.cpu_bf16", "true or false", prec["cpu_bf16"])


def _check_training(card: dict) -> None:
    tr = _object(card, "training", "training")
    if not tr:
        return
    _text(tr, "data", "training.data")
    if tr.get("label_values") is not None:
        lv = tr["label_values"]
        _require(isinstance(lv, list) and all(_is_int(v, 1, 65535) for v in lv), "training.label_values",
                 "a list of mask values from 1 to 65535", lv)
    conf = _object(tr, "config", "training.config")
    if conf:
        for key in ("seed", "split_seed", "max_train", "max_val"):
            _int(conf, key, f"training.config.{key}", 0, 2 ** 63 - 1, none_ok=True)
        for key in ("train_list", "val_list"):
            _text(conf, key, f"training.config.{key}", none_ok=key == "val_list")
        if "val_fraction" in conf:
            _require(_is_number(conf["val_fraction"], 0, 1), "training.config.val_fraction", "a number from 0 to 1",
                     conf["val_fraction"])
    _object(tr, "init_from", "training.init_from")


def validate_card(card, where: str = "model card") -> dict:
    """Check a parsed card; returns it (its orientation code normalised). ``where`` starts the error message."""
    if not isinstance(card, dict):
        raise GMSError(f"{where} must be a JSON object, not {type(card).__name__}: {_show(card)}")
    for key in REQUIRED:
        if key not in card:
            raise GMSError(f"{where} lacks '{key}'")
    try:
        if "format_version" in card:
            v = card["format_version"]
            _require(_is_int(v, 1, 10 ** 6), "format_version", "a positive integer", v)
            if v > FORMAT_VERSION:
                raise GMSError(f"{where} has format version {v}: written by a newer GMSSegment (this one reads up to "
                               f"{FORMAT_VERSION}); update the extension")
        for key in ("name", "version", "description", "engine_version", "licence", "citation"):
            _text(card, key, key)
        _check_foundation(card["foundation"])
        _int(card, "input_size", "input_size", 8, MAX_INPUT_SIZE, optional=False)
        _require(card["input_size"] % 8 == 0, "input_size", "a multiple of 8 (the autoencoder's downscale)",
                 card["input_size"])
        _check_normalization(card["normalization"])
        _int(card, "axis", "axis", 0, 2)
        if "dimension" in card:
            _require(card["dimension"] in (2, 3) and not isinstance(card["dimension"], bool), "dimension", "2 or 3",
                     card["dimension"])
        _check_segments(card["segments"])
        _check_lmm(card["lmm"])
        _check_options(card)
        _check_precision(card)
        _check_training(card)
        _object(card, "metrics", "metrics")
        _int(card, "trainable_parameters", "trainable_parameters", 0, 2 ** 63 - 1)
        if card.get("orientation") is not None:
            _require(isinstance(card["orientation"], str), "orientation", "an orientation code such as 'RAS'",
                     card["orientation"])
            try:
                card["orientation"] = check_code(card["orientation"])
            except GMSError as e:
                raise GMSError(f"{where}: 'orientation': {e}") from None
    except _Invalid as e:
        field, expected, value = e.args
        raise GMSError(f"{where}: '{field}' must be {expected}, got {_show(value)}") from None
    return card


def parse_card(card, where: str = "model card") -> ModelCard:
    """Check a parsed card (see :func:`validate_card`) and return it as a :class:`ModelCard`."""
    return ModelCard.from_dict(validate_card(card, where))


def load_card(path: str | Path) -> ModelCard:
    """Read and check a ``card.json``; any problem is a one-line :class:`GMSError` naming the file and the field."""
    path = Path(path)
    try:
        card = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise GMSError(f"cannot read the model card {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise GMSError(f"model card {path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    except RecursionError:
        raise GMSError(f"model card {path} is not valid JSON: nested too deeply") from None
    except json.JSONDecodeError as e:
        raise GMSError(f"model card {path} is not valid JSON: {e}") from None
    return parse_card(card, f"model card {path}")
