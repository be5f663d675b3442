"""Resolving foundation-model weight files: a local folder, the user cache, or a pinned download checked by SHA-256.

Where :func:`resolve_weights` looks, in this order:

1. the ``weights_dir`` argument (CLI ``--weights-dir``),
2. the environment variable ``GMS_WEIGHTS_DIR``,
3. the user cache ``<cache root>/<name>/``; the cache root is ``GMS_CACHE_DIR`` if set, else
   ``$XDG_CACHE_HOME/gmssegment``, else ``~/.cache/gmssegment``,
4. the shared data/weights folder beside the project (``$GMS_SHARED`` or ``../shared``; ``GMS_SHARED=""`` turns
   this off), ``<shared>/models/<name>/``, when all its files are there and match their pinned SHA-256,
5. a download of the missing files into that cache from their pinned URLs.

An explicit folder (1 or 2) may hold the files directly (``<folder>/<file>``) or in a sub-folder named after the model
(``<folder>/<name>/<file>``), so both ``.../models/taef2`` and ``.../models`` work. A file missing there is an error
naming it; nothing is downloaded behind the user's back. Every file is checked against its pin wherever it comes
from (size, then SHA-256): a wrong or damaged file in an explicit folder is an error naming it, the shared folder is
used only when all its files match, and a damaged file in the cache is downloaded again.

A file's SHA-256 is computed once and remembered by the file's identity (resolved path, size, modification and change
time in ns, inode, device), in this process and across runs in ``<cache root>/verified-weights.json`` (only digests
that matched a pin; a file changed within the last 2 s is not remembered, so that a rewrite within the same timestamp
tick is not missed). Rewriting a file, even to the same size and with its modification time set back, changes its
change time, which no user can set, so it is hashed again.

Downloads stream into a hidden temporary file next to the destination, are hashed on the fly and are renamed into
place only after the SHA-256 matched; on any failure (HTTP error, server unreachable, hash mismatch, interruption) the
temporary file is removed and a :class:`GMSError` with a one-line message is raised.

Overriding where files come from (tests, mirrors, air-gapped sites):

* ``urls={"taef2_encoder.pth": "http://..."}`` argument of :func:`resolve_weights` (per file), or
* environment variable ``GMS_DOWNLOAD_BASE_URL``: every pinned file is fetched from ``<base>/<file name>`` (the
  sample images of samples.py too, by their cached file name).

The hashes stay pinned whatever the URL. ``GMS_OFFLINE=1`` (or ``allow_download=False``) turns a needed download into
an error instead.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from . import GMSError, __version__

log = logging.getLogger(__name__)

#: progress(done_bytes, total_bytes); total_bytes is None when neither the server nor the registry tells the size.
#: Exceptions raised by the callback (e.g. a cancel request) abort the download and propagate, cleaning up first.
ProgressCallback = Callable[[int, "int | None"], None]

ENV_WEIGHTS_DIR = "GMS_WEIGHTS_DIR"
ENV_CACHE_DIR = "GMS_CACHE_DIR"
ENV_BASE_URL = "GMS_DOWNLOAD_BASE_URL"
ENV_OFFLINE = "GMS_OFFLINE"

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class PinnedFile:
    name: str
    sha256: str
    url: str
    size: int | None = None


@dataclass(frozen=True)
class FoundationWeights:
    name: str
    files: tuple[PinnedFile, ...]
    licence: str
    source: str

    @property
    def file_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.files)


_TAESD_COMMIT = "5cccb12"
_TAESD_RAW = f"https://github.com/madebyollin/taesd/raw/{_TAESD_COMMIT}/"

REGISTRY: dict[str, FoundationWeights] = {
    "taef2": FoundationWeights(
        name="taef2",
        files=(
            PinnedFile("taef2_encoder.pth", "10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6",
                       _TAESD_RAW + "taef2_encoder.pth", 2704692),
            PinnedFile("taef2_decoder.pth", "0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5",
                       _TAESD_RAW + "taef2_decoder.pth", 2704756),
        ),
        licence="MIT (Copyright (c) 2023 Ollin Boer Bohan)",
        source=f"github.com/madebyollin/taesd at commit {_TAESD_COMMIT}",
    ),
}


def known_weights() -> list[str]:
    return sorted(REGISTRY)


def weights_info(name: str) -> FoundationWeights:
    try:
        return REGISTRY[name]
    except KeyError:
        raise GMSError(f"no pinned weights for foundation model '{name}'; known: {', '.join(known_weights())}") from None


# -- hashing ------------------------------------------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


#: the in-process memo of SHA-256 digests by file identity (see _identity); across runs: MEMO_FILE in the cache root
_verified: dict[tuple, str] = {}
MEMO_FILE = "verified-weights.json"
_MEMO_MAX = 64  # entries kept in MEMO_FILE (the newest)
_SETTLE_NS = 2_000_000_000  # a file changed more recently than this may still change within its timestamp tick


def _identity(path: Path) -> tuple:
    """What must stay equal for a remembered digest to hold: the resolved path, size, modification and change time (ns),
    inode and device. The change time moves on every write and on every ``utime`` (no user can set it), so a rewrite of
    the same size whose modification time is set back is still seen."""
    st = path.stat()
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


_MEMO_FIELDS = ("path", "size", "mtime_ns", "ctime_ns", "inode", "device")


def _memo_read() -> dict[tuple, str]:
    """The remembered digests of MEMO_FILE by identity; an unreadable or malformed memo counts as empty."""
    try:
        data = json.loads((cache_root() / MEMO_FILE).read_text())
        entries = data["files"]
        return {tuple(e[k] for k in _MEMO_FIELDS): str(e["sha256"]) for e in entries}
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        return {}


def _memo_add(key: tuple, digest: str) -> None:
    """Remember a verified digest across runs (best effort: a read-only cache only costs a hash per run)."""
    memo = {k: v for k, v in _memo_read().items() if k[0] != key[0]}
    memo[key] = digest
    entries = [dict(zip(_MEMO_FIELDS, k), sha256=v) for k, v in list(memo.items())[-_MEMO_MAX:]]
    path = cache_root() / MEMO_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{MEMO_FILE}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"files": entries}, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        log.debug("cannot write %s: %s", path, e)


def _sha256_cached(path: Path, pinned: PinnedFile | None = None) -> str:
    """sha256_file, remembered by the file's identity in this process and, when it matches ``pinned``, across runs."""
    key = _identity(path)
    digest = _verified.get(key)
    if digest is None:
        digest = _memo_read().get(key)
    if digest is None:
        digest = sha256_file(path)
        if _identity(path) != key or time.time_ns() - max(key[2], key[3]) < _SETTLE_NS:
            return digest  # changed while hashed, or may still change unseen: not remembered
        if pinned is not None and digest == pinned.sha256:
            _memo_add(key, digest)
    _verified[key] = digest
    return digest


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, hashed only when the file changed since it was last hashed (see _identity)."""
    return _sha256_cached(Path(path))


def check_file(path: Path, pinned: PinnedFile) -> str | None:
    """None when ``path`` is the pinned file, else why not (one line naming the file)."""
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if pinned.size is not None and size != pinned.size:
        return f"{path} has {size} bytes, expected {pinned.size} (wrong or damaged file)"
    actual = _sha256_cached(path, pinned)
    if actual != pinned.sha256:
        return f"SHA-256 of {path} is {actual}, expected {pinned.sha256} (wrong or damaged file)"
    return None


def _file_ok(path: Path, pinned: PinnedFile) -> bool:
    return check_file(path, pinned) is None


# -- locations ----------------------------------------------------------------------------------------------------------
def cache_root() -> Path:
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "gmssegment"


def cache_dir(name: str) -> Path:
    """The cache folder of one foundation model (not created here)."""
    return cache_root() / name


def download_url(pinned: PinnedFile, urls: Mapping[str, str] | None = None) -> str:
    """Where ``pinned`` is downloaded from: ``urls[name]``, else ``$GMS_DOWNLOAD_BASE_URL/<name>``, else its pin."""
    if urls and pinned.name in urls:
        return urls[pinned.name]
    base = os.environ.get(ENV_BASE_URL)
    if base:
        return base.rstrip("/") + "/" + pinned.name
    return pinned.url


def _explicit_folder(spec: FoundationWeights, folder: Path, origin: str) -> Path:
    folder = folder.expanduser()
    if not folder.is_dir():
        raise GMSError(f"{origin} {folder} is not a folder (expected the {spec.name} files "
                       f"{', '.join(spec.file_names)})")
    candidates = [folder, folder / spec.name]
    for cand in candidates:
        if all((cand / f).is_file() for f in spec.file_names):
            break
    else:
        # report against whichever candidate holds more of the files (the plain folder on a tie)
        cand = max(candidates, key=lambda c: sum((c / f).is_file() for f in spec.file_names))
        missing = [f for f in spec.file_names if not (cand / f).is_file()]
        raise GMSError(f"{spec.name} weights: {', '.join(missing)} not found in {cand} ({origin}; also looked in "
                       f"{folder / spec.name}); get {'it' if len(missing) == 1 else 'them'} from "
                       f"{next(p.url for p in spec.files if p.name == missing[0])}, or leave {origin} unset to "
                       f"download into the cache")
    for pinned in spec.files:
        problem = check_file(cand / pinned.name, pinned)
        if problem:
            raise GMSError(f"{spec.name} weights: {problem}; get the pinned file from {pinned.url} ({origin})")
    return cand


def shared_dir() -> Path | None:
    """The shared data/weights folder: ``$GMS_SHARED``, else ``../shared`` beside the project, when it exists."""
    env = os.environ.get("GMS_SHARED")
    if env == "":
        return None
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2].parent / "shared")
    for c in candidates:
        if c.is_dir():
            return c
    return None


def offline() -> bool:
    """Whether ``GMS_OFFLINE`` turns downloads off."""
    return os.environ.get(ENV_OFFLINE, "").strip().lower() not in ("", "0", "false", "no")


def resolve_weights(name: str, weights_dir: str | Path | None = None, progress: ProgressCallback | None = None, *,
                    urls: Mapping[str, str] | None = None, allow_download: bool = True) -> Path:
    """Return a folder holding all pinned files of foundation model ``name``, each verified against its pin (see the
    module docstring for the order).

    ``urls`` maps file names to download URLs (overrides ``GMS_DOWNLOAD_BASE_URL`` and the pinned URL).
    ``progress(done, total)`` replaces the tqdm bar on stderr during downloads.
    """
    spec = weights_info(name)
    if weights_dir is not None and str(weights_dir) != "":
        return _explicit_folder(spec, Path(weights_dir), "--weights-dir")
    env = os.environ.get(ENV_WEIGHTS_DIR)
    if env:
        return _explicit_folder(spec, Path(env), ENV_WEIGHTS_DIR)

    folder = cache_dir(name)
    shared = shared_dir()
    if shared is not None and not any((folder / p.name).is_file() for p in spec.files):
        candidate = shared / "models" / name
        if all(_file_ok(candidate / p.name, p) for p in spec.files):
            return candidate  # the verified shared copy beside the project (this workplace's machines and CI)
    todo = []
    for pinned in spec.files:
        path = folder / pinned.name
        if path.exists() and not _file_ok(path, pinned):
            log.warning("cached %s is damaged (size or SHA-256 mismatch); downloading it again", path)
            path.unlink()
        if not path.is_file():
            todo.append(pinned)
    if todo and (not allow_download or offline()):
        raise GMSError(f"{name} weights not in the cache {folder} ({', '.join(p.name for p in todo)} missing) and "
                       f"downloads are disabled; use --weights-dir or {ENV_WEIGHTS_DIR} to point at a folder holding "
                       f"them")
    created = todo and not folder.exists()
    try:
        for pinned in todo:
            download_file(download_url(pinned, urls), folder / pinned.name, pinned.sha256, progress, size=pinned.size)
    except BaseException:
        if created:  # leave no empty cache folder behind
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    return folder


# -- downloading --------------------------------------------------------------------------------------------------------
def _content_length(response) -> int | None:
    value = response.headers.get("Content-Length")
    try:
        n = int(value) if value is not None else None
    except ValueError:
        return None
    return n if n is not None and n >= 0 else None


def download_file(url: str, dest: str | Path, sha256: str, progress: ProgressCallback | None = None, *,
                  size: int | None = None, timeout: float = _TIMEOUT_S) -> Path:
    """Download ``url`` to ``dest`` (parent folders created), verifying the hex ``sha256``; returns ``dest``.

    The bytes go to a hidden temporary file in ``dest``'s folder that is renamed onto ``dest`` only after the hash
    matched, so ``dest`` is either absent, untouched or complete. Progress goes to ``progress(done, total)`` if given,
    else to a tqdm bar on stderr. Failures raise :class:`GMSError` (one-line message) and leave nothing behind.
    """
    if not sha256 or len(sha256) != 64:
        raise ValueError(f"download_file needs the expected hex SHA-256 of {url}")
    expected = sha256.lower()
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GMSError(f"cannot create the download folder {dest.parent}: {e.strerror or e}") from None
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    bar = None
    moved = False
    try:
        request = urllib.request.Request(url, headers={"User-Agent": f"GMSSegment/{__version__}"})
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise GMSError(f"download failed: {url} answered HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            raise GMSError(f"download failed: cannot reach {url} ({e.reason})") from None
        except (socket.timeout, TimeoutError):
            raise GMSError(f"download failed: {url} did not answer within {timeout:g} s") from None
        except (OSError, ValueError) as e:
            raise GMSError(f"download failed: {url}: {e}") from None
        h = hashlib.sha256()
        done = 0
        with response, os.fdopen(fd, "wb") as out:
            fd = -1
            total = _content_length(response) or size
            if progress is None:
                from tqdm import tqdm
                bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                           file=sys.stderr, leave=False)
            else:
                progress(0, total)
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, ValueError) as e:  # reset connection, timeout, truncated chunked transfer
                    raise GMSError(f"download failed: {url} broke off after {done} bytes ({e})") from None
                if not chunk:
                    break
                out.write(chunk)
                h.update(chunk)
                done += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
                else:
                    progress(done, total)
            out.flush()
            os.fsync(out.fileno())
        actual = h.hexdigest()
        if actual != expected:
            raise GMSError(f"download failed: SHA-256 mismatch for {url} ({done} bytes): expected {expected}, "
                           f"got {actual}; the file was discarded")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dest)
        moved = True
        _verified[_identity(dest)] = actual  # hashed on the fly: remembered in this process
        return dest
    except OSError as e:  # local write errors (disk full, permissions)
        raise GMSError(f"download failed: cannot write {dest}: {e.strerror or e}") from None
    finally:
        if bar is not None:
            bar.close()
        if fd >= 0:
            os.close(fd)
        if not moved:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
