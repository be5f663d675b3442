"""Model cards (GMSSegmentLib.card): a broken or hostile card.json is refused on load with one line naming the field,
exit code 2, no traceback and no output, whatever the command."""
from __future__ import annotations

import copy
import json
import os
import signal
from pathlib import Path

import pytest

from conftest import run_gms
from GMSSegmentLib import GMSError, cli
from GMSSegmentLib.card import validate_card
from GMSSegmentLib.model import GMSModel, make_segments
from GMSSegmentLib.modelpaths import resolve_model_path

BASE = resolve_model_path("busi-lesion")
CARD = json.loads((BASE / "card.json").read_text())
NAN = float("nan")


def _set(path: str, value):
    """A change of the bundled busi-lesion card: the value at a dotted path (list indices as numbers)."""
    def change(card):
        *parents, last = path.split(".")
        d = card
        for k in parents:
            d = d[int(k)] if isinstance(d, list) else d[k]
        d[int(last) if isinstance(d, list) else last] = value
        return card
    return change


def _two_segments_sharing(key):
    def change(card):
        seg = dict(card["segments"][0], name="other", code=[0.0, 1.0, 1.0], label=2)
        seg[key] = card["segments"][0][key]
        card["segments"] = [dict(card["segments"][0], code=[1.0, 1.0, 0.0]), seg]
        return card
    return change


# (id, change of the card or the card file's raw text, the field the error names)
HOSTILE = [
    ("segments-empty", _set("segments", []), "'segments'"),
    ("segments-dict", _set("segments", {"lesion": 1}), "'segments'"),
    ("segment-string", _set("segments", ["lesion"]), "'segments[0]'"),
    ("input-size-string", _set("input_size", "224"), "'input_size'"),
    ("input-size-zero", _set("input_size", 0), "'input_size'"),
    ("input-size-odd", _set("input_size", 225), "'input_size'"),
    ("label-string", _set("segments.0.label", "1"), "'segments[0].label'"),
    ("label-too-big", _set("segments.0.label", 300), "'segments[0].label'"),
    ("colour-nan", _set("segments.0.color", [NAN, 0, 0]), "'segments[0].color'"),
    ("code-missing", _set("segments.0.code", None), "'segments[0].code'"),
    ("labels-repeated", _two_segments_sharing("label"), "'segments[1].label'"),
    ("normalization-string", _set("normalization", "photo"), "'normalization'"),
    ("normalization-mode", _set("normalization.mode", "magic"), "'normalization.mode'"),
    ("foundation-string", _set("foundation", "taef2"), "'foundation'"),
    ("lmm-channels-string", _set("lmm.encoder_channels", "32,64"), "'lmm.encoder_channels'"),
    ("lmm-groups", _set("lmm.groups", 7), "'lmm.groups'"),
    ("lmm-huge", _set("lmm.stem_channels", 10 ** 9), "'lmm.stem_channels'"),
    ("axis", _set("axis", 5), "'axis'"),
    ("tta-scales", _set("tta.scales", [224, "256"]), "'tta.scales'"),
    ("z-smooth-string", _set("postprocess", {"z_smooth": "0.3"}), "'postprocess.z_smooth'"),
    ("training-list", _set("training", []), "'training'"),
    ("newer-format", _set("format_version", 99), "format version 99"),
    ("not-an-object", "[1, 2, 3]", "must be a JSON object"),
    ("nested-too-deep", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("not-utf8", b"\xff\xfe{}", "not UTF-8"),
]


def _hostile_model(tmp_path: Path, change) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    os.symlink(BASE / "model.safetensors", folder / "model.safetensors")
    if callable(change):
        text = json.dumps(change(copy.deepcopy(CARD)))
    else:
        text = change
    (folder / "card.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    return folder


@pytest.fixture
def keep_sigterm():
    """cli.main installs its SIGTERM handler: give pytest its own back."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("change,field", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_card_is_one_line_exit_2_and_no_output(change, field, tmp_path, busi_dir, capfd, keep_sigterm):
    model = _hostile_model(tmp_path, change)
    out = tmp_path / "out"
    out.mkdir()
    rc = cli.main(["segment", str(busi_dir / "images" / "benign_3.png"), "-o", str(out / "mask.png"),
                   "--model", str(model), "--progress", "none"])
    captured = capfd.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith(f"gms: error: model card {model / 'card.json'}"), captured.err
    assert field in lines[0], lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert list(out.iterdir()) == []


def test_empty_segment_list_through_the_worker_and_info(tmp_path, busi_dir):
    """The case that used to exit 0 and write a mask of nothing, run as the Slicer worker runs the command line."""
    model = _hostile_model(tmp_path, _set("segments", []))
    out = tmp_path / "mask.png"
    for args in (["segment", busi_dir / "images" / "benign_3.png", "-o", out, "--model", model, "--progress", "json"],
                 ["info", model]):
        p = run_gms(*args)
        assert p.returncode == 2, p.stderr
        assert p.stderr.strip().splitlines() == [
            f"gms: error: model card {model / 'card.json'}: 'segments' must be a non-empty list of segments, got []"]
        assert not out.exists()


def test_bundled_and_minimal_cards_are_valid():
    """(Every training loads the card it wrote: the tests that train cover the cards gms train writes.)"""
    for name in ("busi-lesion", "kvasir-polyp", "hippocampus"):
        GMSModel.load(resolve_model_path(name))
    card = {"name": "t", "foundation": {"name": "taef2"}, "input_size": 96, "segments": make_segments(["a", "b"]),
            "normalization": {"mode": "window", "center": 40, "width": 400}, "orientation": "ras",
            "lmm": {"latent_channels": 32, "stem_channels": 32, "encoder_channels": [32, 64], "groups": 16,
                    "attention": False}}
    assert validate_card(card)["orientation"] == "RAS"
    with pytest.raises(GMSError, match="'normalization.width' must be a positive number, got 0"):
        validate_card(dict(card, normalization={"mode": "window", "center": 40, "width": 0}))
