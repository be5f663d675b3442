"""The typed model card (GMSSegmentLib.modelcard): read once into typed fields, unknown keys kept, and written back
as the same JSON."""
from __future__ import annotations

import json

import pytest

from GMSSegmentLib import GMSError
from GMSSegmentLib.card import load_card, parse_card
from GMSSegmentLib.modelcard import FoundationSpec, ModelCard, Segment, TTAOptions
from GMSSegmentLib.modelpaths import find_models, resolve_model_path


@pytest.mark.parametrize("name", [n for n, _ in find_models()])
def test_bundled_cards_round_trip_to_the_same_json(name):
    path = resolve_model_path(name) / "card.json"
    card = load_card(path)
    assert isinstance(card, ModelCard)
    assert json.dumps(card.to_dict(), indent=2) + "\n" == path.read_text()


def test_typed_fields_and_defaults():
    card = load_card(resolve_model_path("busi-lesion") / "card.json")
    assert isinstance(card.foundation, FoundationSpec) and card.foundation.name == "taef2"
    assert all(isinstance(s, Segment) for s in card.segments) and card.label_values == [1]
    assert isinstance(card.tta, TTAOptions) and card.tta.views in (1, 2, 4, 8)
    assert card.input_size == 224 and card.dimension == 2 and not card.is_3d
    hippo = load_card(resolve_model_path("hippocampus") / "card.json")
    assert hippo.is_3d and hippo.orientation and hippo.label_values == [1, 2]
    bare = ModelCard.coerce({})
    assert bare.slicing_axis == 0 and bare.is_3d and bare.label_values == [] and bare.tta is None
    assert bare.normalization_or_default == {"mode": "photo"} and bare.to_dict() == {}


def test_unknown_keys_and_key_order_are_kept():
    raw = {"zeta": 1, "name": "m", "tta": {"views": 2, "note": "x"}, "segments": [{"label": 3, "id": "S"}], "alpha": [2]}
    card = ModelCard.from_dict(raw)
    assert card.extra == {"zeta": 1, "alpha": [2]} and card.tta.extra == {"note": "x"}
    assert card.segments[0].extra == {"id": "S"}
    assert list(card.to_dict()) == list(raw) and card.to_dict() == raw
    card.metrics = {}  # a new field goes last, like a new dict key
    card.postprocess = {"largest_component": True}
    assert list(card.to_dict())[-2:] == ["metrics", "postprocess"]
    card.drop("tta")
    assert "tta" not in card.to_dict() and card.tta is None


def test_read_like_a_dict():
    card = ModelCard.from_dict({"name": "m", "tta": {"views": 4}, "segments": [{"label": 1, "name": "a"}]})
    assert card["tta"] == {"views": 4} and card.get("axis", 7) == 7 and "axis" not in card and "tta" in card
    assert card["segments"][0]["name"] == "a" and card.segments[0]["label"] == 1
    card["tta"] = {"views": 2, "scales": [224, 256]}
    assert isinstance(card.tta, TTAOptions) and card.tta.scales == [224, 256]
    del card["tta"]
    assert card.tta is None
    with pytest.raises(KeyError):
        card["tta"]


def test_parse_card_checks_first():
    card = json.loads((resolve_model_path("busi-lesion") / "card.json").read_text())
    assert parse_card(card).name == card["name"]
    with pytest.raises(GMSError, match="model card: 'segments' must be a non-empty list of segments, got \\[\\]"):
        parse_card(dict(card, segments=[]))
