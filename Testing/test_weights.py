"""Resolving and downloading foundation weights (GMSSegmentLib.weights), against a local HTTP server."""
from __future__ import annotations

import http.server
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from GMSSegmentLib import GMSError
from GMSSegmentLib import weights as W
from GMSSegmentLib.autoencoders import TAEF2, foundation_fingerprint, load_foundation

REPO = Path(__file__).resolve().parents[1]
ENC, DEC = "taef2_encoder.pth", "taef2_decoder.pth"
PINNED = {p.name: p for p in W.REGISTRY["taef2"].files}


_SHARED = Path(os.environ.get("GMS_SHARED") or REPO.parent / "shared")  # read before any test changes the env


def shared_dir() -> Path:
    path = _SHARED
    if not (path / "models" / "taef2" / ENC).is_file():
        pytest.fail(f"shared data folder not found: {path} (expected models/taef2/{ENC}); set GMS_SHARED")
    return path


@pytest.fixture
def taef2_dir() -> Path:
    return shared_dir() / "models" / "taef2"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for var in (W.ENV_WEIGHTS_DIR, W.ENV_BASE_URL, W.ENV_OFFLINE, "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(W.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.setenv("GMS_SHARED", "")  # no shared-folder fallback: these tests exercise cache and downloads
    W._verified.clear()


class FileServer:
    """http.server on 127.0.0.1 (ephemeral port) serving a dict name -> bytes; counts requests per name."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.hits: dict[str, int] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                name = self.path.rsplit("/", 1)[-1]
                server.hits[name] = server.hits.get(name, 0) + 1
                data = server.files.get(name)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/taesd"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def real_files(taef2_dir) -> dict[str, bytes]:
    return {f: (taef2_dir / f).read_bytes() for f in (ENC, DEC)}


@pytest.fixture
def serve():
    servers = []

    def start(files):
        s = FileServer(files)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def cache_files(tmp_path) -> list[str]:
    root = tmp_path / "cache"
    """Everything under the cache root (files and folders): empty after a failed download."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def assert_one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


# -- download ---------------------------------------------------------------------------------------------------------
def test_download_good_then_load_from_cache(serve, real_files, monkeypatch, tmp_path):
    srv = serve(real_files)
    monkeypatch.setenv(W.ENV_BASE_URL, srv.base)
    calls = []
    folder = W.resolve_weights("taef2", progress=lambda done, total: calls.append((done, total)))
    assert folder == tmp_path / "cache" / "taef2"
    assert cache_files(tmp_path) == ["taef2", f"taef2/{DEC}", f"taef2/{ENC}"]  # no temporary files left
    for f in (ENC, DEC):
        assert W.sha256_file(folder / f) == PINNED[f].sha256
    assert srv.hits == {ENC: 1, DEC: 1}
    # progress: starts at 0, never decreases within a file, ends at the full size for both files
    assert calls[0] == (0, PINNED[ENC].size)
    assert (PINNED[ENC].size, PINNED[ENC].size) in calls and (PINNED[DEC].size, PINNED[DEC].size) in calls

    # second time: found in the cache (verified), nothing downloaded; the autoencoder loads and encodes
    ae = load_foundation("taef2")
    assert srv.hits == {ENC: 1, DEC: 1}
    assert isinstance(ae, TAEF2)
    with torch.no_grad():
        z = ae.encode(torch.rand(1, 3, 32, 32))
    assert z.shape == (1, 32, 4, 4) and torch.isfinite(z).all()


def test_download_urls_argument_and_tqdm(serve, real_files, tmp_path, capsys):
    srv = serve(real_files)
    urls = {f: f"{srv.base}/{f}" for f in (ENC, DEC)}
    folder = W.resolve_weights("taef2", urls=urls)  # no progress callable: tqdm on stderr
    assert (folder / ENC).is_file() and (folder / DEC).is_file()
    assert srv.hits == {ENC: 1, DEC: 1}
    assert ENC in capsys.readouterr().err


def test_download_corrupt_file_rejected(serve, real_files, monkeypatch, tmp_path):
    bad = dict(real_files)
    data = bytearray(bad[ENC])
    data[len(data) // 2] ^= 0xFF
    bad[ENC] = bytes(data)
    srv = serve(bad)
    monkeypatch.setenv(W.ENV_BASE_URL, srv.base)
    with pytest.raises(GMSError) as err:
        W.resolve_weights("taef2", progress=lambda d, t: None)
    msg = assert_one_line(err)
    assert "SHA-256 mismatch" in msg and PINNED[ENC].sha256 in msg  # expected hash named
    assert cache_files(tmp_path) == []


def test_download_server_down(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(W.ENV_BASE_URL, f"http://127.0.0.1:{port}")
    with pytest.raises(GMSError) as err:
        W.resolve_weights("taef2", progress=lambda d, t: None)
    msg = assert_one_line(err)
    assert "cannot reach" in msg and str(port) in msg
    assert cache_files(tmp_path) == []


def test_download_http_error(serve, monkeypatch, tmp_path):
    srv = serve({})
    monkeypatch.setenv(W.ENV_BASE_URL, srv.base)
    with pytest.raises(GMSError) as err:
        W.resolve_weights("taef2", progress=lambda d, t: None)
    assert "HTTP 404" in assert_one_line(err)
    assert cache_files(tmp_path) == []


def test_progress_callback_can_cancel(serve, real_files, tmp_path):
    srv = serve(real_files)

    class Cancelled(Exception):
        pass

    def progress(done, total):
        if done > 0:
            raise Cancelled

    dest = tmp_path / "cache" / "x" / ENC
    with pytest.raises(Cancelled):
        W.download_file(f"{srv.base}/{ENC}", dest, PINNED[ENC].sha256, progress)
    assert list(dest.parent.iterdir()) == []  # the temporary file is gone


def test_cached_corrupted_file_is_replaced(serve, real_files, monkeypatch, tmp_path):
    folder = tmp_path / "cache" / "taef2"
    folder.mkdir(parents=True)
    (folder / ENC).write_bytes(real_files[ENC])
    data = bytearray(real_files[DEC])
    data[100] ^= 0x01  # same size, different hash
    (folder / DEC).write_bytes(bytes(data))
    srv = serve(real_files)
    monkeypatch.setenv(W.ENV_BASE_URL, srv.base)
    assert W.resolve_weights("taef2", progress=lambda d, t: None) == folder
    assert srv.hits == {DEC: 1}
    assert W.sha256_file(folder / DEC) == PINNED[DEC].sha256


def test_offline_refuses_download(monkeypatch, tmp_path):
    monkeypatch.setenv(W.ENV_OFFLINE, "1")
    with pytest.raises(GMSError) as err:
        W.resolve_weights("taef2")
    assert ENC in assert_one_line(err)
    with pytest.raises(GMSError):
        W.resolve_weights("taef2", allow_download=False)


# -- explicit folders ---------------------------------------------------------------------------------------------------
def test_explicit_folder_direct_and_parent(taef2_dir, monkeypatch):
    assert W.resolve_weights("taef2", taef2_dir) == taef2_dir
    assert W.resolve_weights("taef2", taef2_dir.parent) == taef2_dir  # <folder>/<name>/<file>
    monkeypatch.setenv(W.ENV_WEIGHTS_DIR, str(taef2_dir.parent))
    assert W.resolve_weights("taef2") == taef2_dir
    assert foundation_fingerprint("taef2") == {f: p.sha256 for f, p in PINNED.items()}


def test_explicit_folder_missing_file(taef2_dir, tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    folder.mkdir()
    os.symlink(taef2_dir / ENC, folder / ENC)
    with pytest.raises(GMSError) as err:
        W.resolve_weights("taef2", folder)
    msg = assert_one_line(err)
    assert DEC in msg and ENC not in msg.split("not found")[0]
    assert cache_files(tmp_path) == []  # never falls back to a download
    monkeypatch.setenv(W.ENV_WEIGHTS_DIR, str(folder))
    with pytest.raises(GMSError, match=DEC):
        load_foundation({"name": "taef2"})
    with pytest.raises(GMSError, match="not a folder"):
        W.resolve_weights("taef2", tmp_path / "nope")


def test_explicit_folder_verify_detects_wrong_file(taef2_dir, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    os.symlink(taef2_dir / ENC, folder / ENC)
    os.symlink(taef2_dir / ENC, folder / DEC)  # wrong file under the decoder's name (64 bytes smaller)
    with pytest.raises(GMSError) as err:
        W.resolve_weights("taef2", folder)
    msg = assert_one_line(err)
    assert str(folder / DEC) in msg and f"expected {PINNED[DEC].size}" in msg


def _flip_bit(path: Path, offset: int) -> None:
    """Flip one bit of a file in place (same size, same inode)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ 0x01]))


def _copy_weights(taef2_dir: Path, folder: Path) -> Path:
    folder.mkdir()
    for f in (ENC, DEC):
        (folder / f).write_bytes((taef2_dir / f).read_bytes())
    return folder


def test_explicit_folder_flipped_bit_is_refused(taef2_dir, tmp_path, monkeypatch):
    """One flipped bit in an explicitly named folder's encoder (same size): a one-line error naming the file, by
    --weights-dir and by GMS_WEIGHTS_DIR alike (it used to load and segment nothing)."""
    folder = _copy_weights(taef2_dir, tmp_path / "weights")
    _flip_bit(folder / ENC, PINNED[ENC].size // 2)
    with pytest.raises(GMSError) as err:
        W.resolve_weights("taef2", folder)
    msg = assert_one_line(err)
    assert f"SHA-256 of {folder / ENC} is" in msg and PINNED[ENC].sha256 in msg and "--weights-dir" in msg
    monkeypatch.setenv(W.ENV_WEIGHTS_DIR, str(folder))
    with pytest.raises(GMSError, match=W.ENV_WEIGHTS_DIR) as err:
        load_foundation("taef2")
    assert str(folder / ENC) in assert_one_line(err)


def test_verified_digests_are_remembered_until_the_file_changes(taef2_dir, tmp_path, monkeypatch):
    """A file is hashed once and its digest remembered across runs (the memo in the cache root) by its identity; a
    same-size rewrite whose modification time is set back is hashed again and refused."""
    monkeypatch.setattr(W, "_SETTLE_NS", 0)  # the files were just copied; remember them at once
    folder = _copy_weights(taef2_dir, tmp_path / "weights")
    assert W.resolve_weights("taef2", folder) == folder
    memo_path = tmp_path / "cache" / W.MEMO_FILE
    memo = json.loads(memo_path.read_text())
    assert sorted((Path(e["path"]).name, e["sha256"]) for e in memo["files"]) == sorted(
        (f, PINNED[f].sha256) for f in (ENC, DEC))

    # a new run (empty in-process memo) takes the remembered digest instead of hashing: shown by a memo entry edited
    # to another digest, which is then what the file is judged by
    W._verified.clear()
    for e in memo["files"]:
        if e["path"].endswith(ENC):
            e["sha256"] = "0" * 64
    memo_path.write_text(json.dumps(memo))
    with pytest.raises(GMSError, match="0" * 64):
        W.resolve_weights("taef2", folder)
    memo_path.write_text("{not json")  # a damaged memo counts as empty: the files are hashed again
    W._verified.clear()
    assert W.resolve_weights("taef2", folder) == folder

    # one bit flipped in place, size kept, modification time set back: the change time moved, so it is hashed again
    st = (folder / ENC).stat()
    time.sleep(0.05)  # past the file system's timestamp tick
    _flip_bit(folder / ENC, 1000)
    os.utime(folder / ENC, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (folder / ENC).stat().st_size == st.st_size and (folder / ENC).stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(GMSError) as err:
        W.resolve_weights("taef2", folder)
    assert f"SHA-256 of {folder / ENC}" in assert_one_line(err)


class _RunsCode:
    """Unpickling this calls open(marker, "w"): the marker file shows that the pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_as_encoder_is_refused(taef2_dir, tmp_path):
    """A pickle that would run code, under the encoder's name: never executed, a one-line error naming it, both when
    the file reaches the loader and (earlier) when the folder is resolved."""
    marker = tmp_path / "pickle-ran"
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save({"0.weight": _RunsCode(marker)}, folder / ENC)
    os.symlink(taef2_dir / DEC, folder / DEC)
    with pytest.raises(GMSError) as err:
        TAEF2.from_folder(folder)
    msg = assert_one_line(err)
    assert str(folder / ENC) in msg and "could run code" in msg
    with pytest.raises(GMSError) as err:
        load_foundation("taef2", weights_dir=folder)
    assert str(folder / ENC) in assert_one_line(err)
    assert not marker.exists()
    (folder / ENC).write_bytes((taef2_dir / ENC).read_bytes()[:5000])  # a damaged file: one line as well
    with pytest.raises(GMSError, match="cannot load TAEF2 weights") as err:
        TAEF2.from_folder(folder)
    assert_one_line(err)


def test_gms_segment_refuses_bad_weights_folders(taef2_dir, tmp_path):
    """The command line with a damaged encoder, and with a code-running pickle posing as it: exit 2, one line naming
    the file, no traceback, no output, the pickle never run."""
    from conftest import run_gms

    image = shared_dir() / "data" / "busi" / "images" / "benign_3.png"
    flipped = _copy_weights(taef2_dir, tmp_path / "flipped")
    _flip_bit(flipped / ENC, PINNED[ENC].size // 2)
    marker = tmp_path / "pickle-ran"
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"0.weight": _RunsCode(marker)}, evil / ENC)
    os.symlink(taef2_dir / DEC, evil / DEC)
    for folder in (flipped, evil):
        out = tmp_path / f"{folder.name}.png"
        p = run_gms("segment", image, "-o", out, "--weights-dir", folder, "--progress", "none")
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gms: error: ") and str(folder / ENC) in lines[0], p.stderr
        assert not out.exists() and p.stdout == ""
    assert not marker.exists()


def test_unknown_names():
    with pytest.raises(GMSError, match="taef2"):
        W.resolve_weights("nope")
    with pytest.raises(GMSError) as err:
        load_foundation("nope")
    msg = assert_one_line(err)
    assert "taef2" in msg and "diffusers-kl" in msg and "diffusers-tiny" in msg
    with pytest.raises(GMSError):
        load_foundation({"path": "x"})


def test_sha256_file(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    assert W.sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_default_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv(W.ENV_CACHE_DIR)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert W.cache_dir("taef2") == tmp_path / "home" / ".cache" / "gmssegment" / "taef2"
    monkeypatch.setenv(W.ENV_CACHE_DIR, str(tmp_path / "c"))
    assert W.cache_dir("taef2") == tmp_path / "c" / "taef2"


def test_shared_folder_is_used_before_downloading(monkeypatch):
    """Beside a shared folder holding verified weights (this workplace, CI), nothing is downloaded."""
    monkeypatch.setenv("GMS_SHARED", str(shared_dir()))
    monkeypatch.setenv(W.ENV_BASE_URL, "http://127.0.0.1:9")  # would fail if a download were attempted
    assert W.resolve_weights("taef2") == shared_dir() / "models" / "taef2"
