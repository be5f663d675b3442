"""The Slicer Extensions Index entry GMSSegment.json: it validates against the index's catalog entry schema (a copy in
Testing/data, see the .md beside it), passes the offline parts of the index's own checks
(Slicer/ExtensionsIndex scripts/check_description_files.py: file name = CMake project, repository name, LF endings,
icon and screenshot URLs in the form its regular expressions read, a licence file), and says what CMakeLists.txt and
GMSSegment.s4ext say. Also the result figures named as screenshots, and the script that draws them."""
from __future__ import annotations

import copy
import importlib.util
import json
import re
import urllib.parse
from pathlib import Path

import jsonschema
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
ENTRY = REPO / "GMSSegment.json"
SCHEMA = Path(__file__).resolve().parent / "data" / "slicer-extension-catalog-entry-schema-v1.0.1.json"
RAW = "https://raw.githubusercontent.com/"


def entry() -> dict:
    return json.loads(ENTRY.read_text(encoding="utf-8"))


def cmake_text() -> str:
    return (REPO / "CMakeLists.txt").read_text(encoding="utf-8")


def cmake_field(name: str) -> str:
    m = re.search(rf"^set\({name}\s+(.*?)\)\s*(?:#.*)?$", cmake_text(), re.M)
    assert m, f"{name} is not set in CMakeLists.txt"
    return m.group(1).strip().strip('"')


def s4ext() -> dict[str, str]:
    lines = (REPO / "GMSSegment.s4ext").read_text(encoding="utf-8").splitlines()
    pairs = [ln.strip().partition(" ") for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    return {key: value.strip() for key, _, value in pairs}


def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_entry_validates_against_the_catalog_schema():
    v = validator()
    e = entry()
    assert e["$schema"].rstrip("#") == v.schema["$id"].rstrip("#")  # names the schema it is validated against
    v.validate(e)
    assert e["build_dependencies"] == ["PyTorch"]


@pytest.mark.parametrize("change", ["unknown key", "no category", "dependencies not a list", "tier out of range"])
def test_the_schema_rejects_a_broken_entry(change):
    e = copy.deepcopy(entry())
    if change == "unknown key":
        e["screenshots"] = []
    elif change == "no category":
        del e["category"]
    elif change == "dependencies not a list":
        e["build_dependencies"] = "PyTorch"
    else:
        e["tier"] = 6
    assert list(validator().iter_errors(e)), change


def test_entry_passes_the_index_checks_that_need_no_network():
    raw = ENTRY.read_bytes()
    assert b"\r" not in raw and raw.endswith(b"\n")
    e = entry()
    name = ENTRY.stem
    project = re.search(r"project\s*\(\s*([^\s\)\n\r]+)", cmake_text(), re.I).group(1)
    assert project == name and not name.lower().startswith("slicer")
    url = urllib.parse.urlsplit(e["scm_url"])
    assert url.scheme in ("https", "git")
    repo_name = Path(url.path).stem
    assert repo_name.startswith("Slicer") and repo_name != "Slicer"
    # the index reads these two with its own expressions: the value in double quotes, then ")"
    assert re.search(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', cmake_text())
    assert re.search(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', cmake_text())
    licences = ["LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt"]
    assert any((REPO / f).is_file() for f in licences)


def test_entry_agrees_with_cmakelists_and_s4ext():
    e, s = entry(), s4ext()
    assert e["scm_url"] == s["scmurl"] and s["scm"] == "git" and e.get("scm_type", "git") == "git"
    assert e["scm_revision"] == s["scmrevision"]
    assert e["category"] == s["category"] == cmake_field("EXTENSION_CATEGORY")
    assert e["build_dependencies"] == s["depends"].split() == cmake_field("EXTENSION_DEPENDS").split()
    assert e["build_subdirectory"] == s["build_subdirectory"] == cmake_field("EXTENSION_BUILD_SUBDIRECTORY")
    homepage = cmake_field("EXTENSION_HOMEPAGE")
    assert homepage == s["homepage"] and e["scm_url"].removesuffix(".git") == homepage
    for key, field in (("contributors", "CONTRIBUTORS"), ("description", "DESCRIPTION"), ("iconurl", "ICONURL"),
                       ("screenshoturls", "SCREENSHOTURLS"), ("status", "STATUS")):
        assert s[key] == cmake_field(f"EXTENSION_{field}"), key


def test_contributors_are_names_with_their_organisation():
    # the index's form: "Name (Organization), Name2 ([SubOrg, ]Org2)"
    contributors = cmake_field("EXTENSION_CONTRIBUTORS")
    assert re.fullmatch(r"[^,()]+ \([^()]+\)(, [^,()]+ \([^()]+\))*", contributors), contributors


def test_cmake_minimum_required_comes_first_as_in_the_template():
    first = next(ln for ln in cmake_text().splitlines() if ln.strip() and not ln.startswith("#"))
    assert re.fullmatch(r"cmake_minimum_required\(VERSION (\d+\.\d+\.\d+)\.\.\.(\d+\.\d+\.\d+) FATAL_ERROR\)", first)


def test_licence_is_the_apache_license_the_project_declares():
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert 'license = { text = "Apache-2.0" }' in (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text


def test_screenshots_are_committed_result_figures():
    from PIL import Image

    homepage_repo = urllib.parse.urlsplit(cmake_field("EXTENSION_HOMEPAGE")).path.strip("/")
    urls = cmake_field("EXTENSION_SCREENSHOTURLS").split()
    assert len(urls) >= 2
    for url in urls:
        assert url.startswith(f"{RAW}{homepage_repo}/main/Resources/Screenshots/"), url
        path = REPO / url.split("/main/", 1)[1]
        assert path.stat().st_size < 250_000, path
        with Image.open(path) as im:
            assert im.format == "PNG" and min(im.size) >= 200, path
    assert {Path(u).name for u in urls} == {"busi-lesion-result-2d.png", "hippocampus-result-3d.png"}


def test_figure_script_draws_a_volume_and_its_labels(tmp_path):
    """scripts/make_result_figures.py's 3D figure on a made-up volume and label map (no model run here)."""
    sitk = pytest.importorskip("SimpleITK")
    spec = importlib.util.spec_from_file_location("make_result_figures", REPO / "scripts" / "make_result_figures.py")
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    z, y, x = np.mgrid[:20, :24, :18]
    image = (100 + 50 * np.sin(x / 3.0) + y).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[((z - 10) ** 2 + (y - 8) ** 2 + (x - 9) ** 2) < 16] = 1
    labels[((z - 10) ** 2 + (y - 16) ** 2 + (x - 9) ** 2) < 9] = 2
    paths = {}
    for name, arr in (("image", image), ("labels", labels)):
        img = sitk.GetImageFromArray(arr)
        img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # RAS-aligned, as the hippocampus volumes are
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(img, str(paths[name]))
    segments = [{"name": "one", "label": 1, "color": [0.95, 0.35, 0.25]},
                {"name": "two", "label": 2, "color": [0.3, 0.6, 0.95]}]
    fig = np.asarray(figures.figure_3d(paths["image"], paths["labels"], segments, paths["labels"]))
    for s in segments:  # both segments' colours are drawn, and the surface rendering is not empty
        assert (np.abs(fig.astype(int) - figures.rgb255(s["color"])).sum(axis=2) == 0).sum() > 50, s["name"]
    render = np.asarray(figures.render_surface(labels, np.ones(3), segments, np.array([1.0, -0.35, 0.45]), 64))
    assert (render != figures.BACKGROUND).any(axis=2).mean() > 0.05
