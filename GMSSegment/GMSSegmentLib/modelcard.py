"""The model card as a typed object: :class:`ModelCard`, parsed and checked once (by :mod:`.card`) when it is read.

Engine code reads attributes (``card.input_size``, ``card.foundation.name``, ``card.tta.views``). Keys the engine
does not know are kept in ``extra`` and the order of the keys read is remembered, so ``to_dict()`` written as JSON
gives back the same file. Reading a card like a dict (``card["tta"]``, ``card.get("axis")``) still works for callers
outside the engine (tests, the Slicer side); ``card["x"] = v`` parses ``v`` into the typed field.
No torch here.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Mapping


class _Typed:
    """A JSON object with typed fields: unknown keys kept in ``extra``, the key order of the source remembered."""

    _nested: ClassVar[dict] = {}  # field name -> how to parse it (a callable taking the JSON value)

    @classmethod
    def _field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if not f.name.startswith("_") and f.name != "extra"]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Build from a JSON object without checking it (``card.parse_card`` checks first)."""
        names = cls._field_names()
        kwargs = {k: cls._parse(k, d[k]) for k in names if k in d}
        obj = cls(**kwargs, extra={k: v for k, v in d.items() if k not in names})
        obj._order = list(d.keys())
        return obj

    @classmethod
    def _parse(cls, key: str, value):
        parse = cls._nested.get(key)
        return parse(value) if parse is not None and value is not None else value

    @staticmethod
    def _json(value):
        if isinstance(value, _Typed):
            return value.to_dict()
        if isinstance(value, list):
            return [_Typed._json(v) for v in value]
        return value

    def __setattr__(self, key: str, value) -> None:
        order = self.__dict__.get("_order")
        if order is not None and value is not None and key not in order and key in self._field_names():
            order.append(key)  # a field set after reading goes where a dict would put a new key: last
        super().__setattr__(key, value)

    def _has(self, key: str) -> bool:
        if key in self._field_names():
            return key in self._order or getattr(self, key) is not None
        return key in self.extra

    def to_dict(self) -> dict:
        """The JSON object: keys in the order they were read, then new ones; absent fields stay absent."""
        names = self._field_names()
        keys = [k for k in self._order if self._has(k)]
        keys += [k for k in names + list(self.extra) if k not in keys and self._has(k)]
        return {k: self._json(getattr(self, k)) if k in names else self.extra[k] for k in keys}

    # -- read like the dict it was read from ------------------------------------------------------------------------
    def __getitem__(self, key: str):
        if not self._has(key):
            raise KeyError(key)
        return self._json(getattr(self, key)) if key in self._field_names() else self.extra[key]

    def get(self, key: str, default=None):
        return self[key] if self._has(key) else default

    def __contains__(self, key) -> bool:
        return isinstance(key, str) and self._has(key)

    def keys(self):
        return self.to_dict().keys()

    def items(self):
        return self.to_dict().items()

    def __setitem__(self, key: str, value) -> None:
        if key in self._field_names():
            setattr(self, key, self._parse(key, value))
        else:
            self.extra[key] = value
        if key not in self._order:
            self._order.append(key)

    def __delitem__(self, key: str) -> None:
        if not self._has(key):
            raise KeyError(key)
        self.drop(key)

    def drop(self, key: str) -> None:
        """Remove a key: it is absent from ``to_dict()`` (as ``dict.pop(key, None)``)."""
        if key in self._field_names():
            setattr(self, key, None)
        else:
            self.extra.pop(key, None)
        self._order = [k for k in self._order if k != key]


@dataclass(eq=False)
class Segment(_Typed):
    """One output segment: its name, label value in the output, display colour and code colour in the decoded
    image (lists of 3 numbers from 0 to 1)."""

    name: str | None = None
    label: int | None = None
    color: list | None = None
    code: list | None = None
    extra: dict = field(default_factory=dict)
    _order: list = field(default_factory=list, repr=False)


@dataclass(eq=False)
class FoundationSpec(_Typed):
    """The foundation autoencoder a model was trained on: its name, where diffusers models come from (path,
    subfolder, revision), its latent shape and the SHA-256 of its weight files."""

    name: str | None = None
    path: str | None = None
    subfolder: str | None = None
    revision: str | None = None
    latent_channels: int | None = None
    downscale: int | None = None
    files: dict | None = None
    extra: dict = field(default_factory=dict)
    _order: list = field(default_factory=list, repr=False)


@dataclass(eq=False)
class TTAOptions(_Typed):
    """Test-time augmentation chosen on the validation cases: flip views (1, 2, 4 or 8) and input sizes."""

    views: int | None = None
    scales: list | None = None
    extra: dict = field(default_factory=dict)
    _order: list = field(default_factory=list, repr=False)


def _segments(value):
    return [Segment.from_dict(s) if isinstance(s, Mapping) else s for s in value] if isinstance(value, list) else value


def _typed(cls):
    return lambda v: cls.from_dict(v) if isinstance(v, Mapping) else v


@dataclass(eq=False)
class ModelCard(_Typed):
    """Everything a model folder says about its model. ``normalization``, ``lmm``, ``postprocess``, ``presence``
    (presence.py), ``uncertainty`` (uncertainty.py), ``precision`` (bf16 measured against fp32, see
    ``pipeline.inference_precision``), ``training`` and ``metrics`` are the card's JSON objects as read (dicts)."""

    format_version: int | None = None
    name: str | None = None
    version: str | None = None
    description: str | None = None
    engine_version: str | None = None
    licence: str | None = None
    citation: str | None = None
    foundation: FoundationSpec | None = None
    input_size: int | None = None
    normalization: dict | None = None
    axis: int | None = None
    dimension: int | None = None
    orientation: str | None = None
    segments: list | None = None
    lmm: dict | None = None
    tta: TTAOptions | None = None
    postprocess: dict | None = None
    presence: dict | None = None
    uncertainty: dict | None = None
    precision: dict | None = None
    training: dict | None = None
    metrics: dict | None = None
    trainable_parameters: int | None = None
    extra: dict = field(default_factory=dict)
    _order: list = field(default_factory=list, repr=False)

    _nested: ClassVar[dict] = {"foundation": _typed(FoundationSpec), "tta": _typed(TTAOptions),
                               "segments": _segments}

    @classmethod
    def coerce(cls, card) -> "ModelCard":
        """A ModelCard as is; a dict (e.g. a partial card in a test) read without checks."""
        return card if isinstance(card, ModelCard) else cls.from_dict(card or {})

    # -- what the engine reads, with the defaults it has always used ------------------------------------------------
    @property
    def slicing_axis(self) -> int:
        return int(self.axis or 0)

    @property
    def is_3d(self) -> bool:
        """3D unless the card says 2 (cards written before 'dimension' existed are 3D)."""
        return int(self.dimension if self.dimension is not None else 3) == 3

    @property
    def label_values(self) -> list[int]:
        """The output label value of each segment."""
        return [s.label for s in self.segments or []]

    @property
    def trained_label_values(self) -> list[int] | None:
        """The mask values the model was trained on (None when the card does not record them)."""
        return (self.training or {}).get("label_values")

    @property
    def normalization_or_default(self) -> dict:
        return self.normalization if self.normalization is not None else {"mode": "photo"}
