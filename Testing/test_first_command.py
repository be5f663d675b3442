"""The README's first command, run as on a fresh machine: no ``../shared`` (``GMS_SHARED`` is an empty folder), no
weights folder, ``HOME`` in a temporary folder, and the pinned sample and foundation weights downloaded from a loopback
HTTP server that holds the upstream bytes (``GMS_DOWNLOAD_BASE_URL``). The command is read from README.md itself."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED, run_gms
from test_weights import FileServer
from GMSSegmentLib.samples import SAMPLES, fetch_sample
from GMSSegmentLib.weights import ENV_BASE_URL, REGISTRY

REPO = Path(__file__).resolve().parents[1]
SETUP = "bash scripts/setup.sh && "
SAMPLE = SAMPLES["busi-malignant-3"]
UPSTREAM_SAMPLE = Path(__file__).parent / "data" / "busi_malignant_3.png"  # upstream bytes, origin in the .md beside it
SERVER_LIFETIME_S = 300  # the server stops by itself after this, whatever happens to the test


def first_command() -> str:
    """The first ``bash`` block under "## Two commands for a fresh machine", without its leading setup step."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Two commands for a fresh machine\n", 1)
    assert len(section) == 2, "README.md has no section '## Two commands for a fresh machine'"
    block = re.search(r"^```bash\n(.*?)^```", section[1], re.S | re.M)
    assert block, "no ```bash block under '## Two commands for a fresh machine'"
    command = block.group(1).strip()
    assert command.startswith(SETUP) and "\n" not in command, command
    return command[len(SETUP):]


def venv() -> Path:
    """The environment running the tests (the one setup.sh made), which the command calls as ``.venv``."""
    for cand in (Path(sys.prefix), REPO / ".venv"):
        if (cand / "bin" / "gms").is_file():
            return cand
    pytest.fail(f"no gms command in {sys.prefix} or {REPO / '.venv'}: run bash scripts/setup.sh")


def upstream_files() -> dict[str, bytes]:
    """What the server holds: the committed upstream sample and the TAEF2 files of ../shared (byte-identical to
    upstream). They are not compared with the pins here: the command must do that."""
    files = {SAMPLE["filename"]: UPSTREAM_SAMPLE.read_bytes()}
    for pinned in REGISTRY["taef2"].files:
        files[pinned.name] = (SHARED / "models" / "taef2" / pinned.name).read_bytes()
    return files


@pytest.fixture
def serve():
    running = []

    def start(files: dict[str, bytes]) -> FileServer:
        srv = FileServer(files)
        stop = threading.Timer(SERVER_LIFETIME_S, srv.httpd.shutdown)
        stop.daemon = True
        stop.start()
        running.append((srv, stop))
        return srv

    yield start
    for srv, stop in running:
        stop.cancel()
        srv.close()


def run_first_command(tmp_path: Path, base_url: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """Run the command in an empty working folder whose ``.venv`` is the test environment; returns the process,
    the working folder and HOME."""
    work, home, shared = tmp_path / "work", tmp_path / "home", tmp_path / "empty_shared"
    for d in (work, home, shared):
        d.mkdir()
    (work / ".venv").symlink_to(venv(), target_is_directory=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("GMS_WEIGHTS_DIR", "GMS_CACHE_DIR", "GMS_OFFLINE", "XDG_CACHE_HOME", "PYTHONPATH")}
    env.update(HOME=str(home), GMS_SHARED=str(shared), **{ENV_BASE_URL: base_url})
    p = subprocess.run(["bash", "-c", first_command()], cwd=work, env=env, capture_output=True, text=True,
                       encoding="utf-8", errors="replace", timeout=300)
    return p, work, home


def output_of(command: str) -> str:
    match = re.search(r"-o\s+(\S+)\s*$", command)
    assert match, f"the first command names no output with -o: {command}"
    return match.group(1)


def test_upstream_sample_copy_is_what_its_note_records():
    """The committed copy has the SHA-256 its note records, and the note's origin is the URL samples.py downloads."""
    note = UPSTREAM_SAMPLE.with_suffix(".md").read_text(encoding="utf-8")
    assert hashlib.sha256(UPSTREAM_SAMPLE.read_bytes()).hexdigest() in note
    assert SAMPLE["url"] in note


def test_first_command_on_a_fresh_machine(serve, tmp_path):
    srv = serve(upstream_files())
    p, work, home = run_first_command(tmp_path, srv.base)
    assert p.returncode == 0, p.stdout + p.stderr
    cache = home / ".cache" / "gmssegment"
    sample = cache / "samples" / SAMPLE["filename"]
    assert hashlib.sha256(sample.read_bytes()).hexdigest() == SAMPLE["sha256"]
    assert sorted(f.name for f in (cache / "taef2").iterdir()) == sorted(REGISTRY["taef2"].file_names)
    assert srv.hits == {name: 1 for name in srv.files}, srv.hits  # everything downloaded once, nothing else asked

    mask_path = work / output_of(first_command())
    with Image.open(sample) as image, Image.open(mask_path) as mask:
        assert image.mode == "RGB" and mask.size == image.size
        labels = np.asarray(mask)
    assert labels.ndim == 2 and set(np.unique(labels).tolist()) == {0, 255}

    # the RGB download (R == G == B) is segmented exactly as the grayscale copy the model was trained and scored on
    gray = tmp_path / "gray.png"
    run_gms("segment", SHARED / "data" / "busi" / "images" / "malignant_3.png", "-o", gray, check=True)
    with Image.open(gray) as g:
        assert np.array_equal(np.asarray(g), labels)


def test_first_command_refuses_bytes_that_do_not_match_the_pin(serve, tmp_path):
    files = upstream_files()
    altered = bytearray(files[SAMPLE["filename"]])
    altered[len(altered) // 2] ^= 0xFF  # one byte changed
    files[SAMPLE["filename"]] = bytes(altered)
    srv = serve(files)
    p, work, home = run_first_command(tmp_path, srv.base)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    mismatch = [line for line in p.stderr.splitlines() if "SHA-256 mismatch" in line]
    errors = [line for line in p.stderr.splitlines() if "error" in line.lower()]
    assert errors == mismatch, p.stderr  # one clear line: the command stops there (no second error from segment)
    assert len(mismatch) == 1 and mismatch[0].startswith("gms: error: download failed:"), p.stderr
    assert f"/{SAMPLE['filename']}" in mismatch[0] and SAMPLE["sha256"] in mismatch[0]
    assert not (work / output_of(first_command())).exists()
    samples = home / ".cache" / "gmssegment" / "samples"
    assert not samples.exists() or not any(samples.iterdir())  # nothing kept, no partial file
    assert not any(name.startswith("taef2") for name in srv.hits), srv.hits  # segment stopped before loading a model


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_from_shared_else_downloaded(name, serve, monkeypatch, tmp_path):
    """Each sample: the shared copy when ../shared holds it (checked against the shared copy's hash), else the upstream
    bytes downloaded once into the cache and checked against the pin."""
    s = SAMPLES[name]
    monkeypatch.delenv("GMS_OFFLINE", raising=False)
    monkeypatch.setenv("GMS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("GMS_SHARED", str(SHARED))
    assert fetch_sample(name) == SHARED / s["relpath"]

    upstream = UPSTREAM_SAMPLE if name == "busi-malignant-3" else SHARED / s["relpath"]  # hippocampus: stored as is
    srv = serve({s["filename"]: upstream.read_bytes()})
    monkeypatch.setenv(ENV_BASE_URL, srv.base)
    monkeypatch.setenv("GMS_SHARED", str(tmp_path))
    for _ in range(2):
        path = fetch_sample(name)
        assert path == tmp_path / "cache" / "samples" / s["filename"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == s["sha256"]
    assert srv.hits == {s["filename"]: 1}
