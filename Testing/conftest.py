"""Shared fixtures: the shared data/weights folder and a real, briefly trained BUSI model (trained once per session
through the real command line, so the same code path users run)."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "GMSSegment"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))


def _shared() -> Path:
    p = Path(os.environ.get("GMS_SHARED", REPO.parent / "shared"))
    if not (p / "models" / "taef2").is_dir() or not (p / "data").is_dir():
        raise RuntimeError(f"the shared data/weights folder is missing: {p} (set GMS_SHARED)")
    return p


SHARED = _shared()
os.environ.setdefault("GMS_SHARED", str(SHARED))
# the tests never download: foundation weights come from ../shared/models
os.environ["GMS_WEIGHTS_DIR"] = str(SHARED / "models")
# what the engine caches (e.g. the digests of verified weight files) goes to a folder of this run, not the user's home
os.environ["GMS_CACHE_DIR"] = tempfile.mkdtemp(prefix="gms-test-cache-")
atexit.register(shutil.rmtree, os.environ["GMS_CACHE_DIR"], ignore_errors=True)


def worker_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR), env.get("PYTHONPATH", "")])
    return env


def run_gms(*args, check=False, timeout=600, **kw) -> subprocess.CompletedProcess:
    """Run the command line exactly as the Slicer worker does: ``python -m GMSSegmentLib ...``."""
    # decoded as UTF-8, not in the test process's locale encoding (one CI run had it ASCII; the bars are not ASCII)
    env = kw.pop("env", None) or worker_env()
    p = subprocess.run([sys.executable, "-m", "GMSSegmentLib", *map(str, args)], capture_output=True, text=True,
                       encoding="utf-8", errors="replace", env=env, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"gms {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED


@pytest.fixture(scope="session")
def busi_dir(shared_dir) -> Path:
    return shared_dir / "data" / "busi"


@pytest.fixture(scope="session")
def hippo_dir(shared_dir) -> Path:
    return shared_dir / "data" / "hippocampus"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A real GMS model: trained through ``gms train`` for a few epochs on 24 BUSI training images."""
    out = tmp_path_factory.mktemp("models") / "busi-tiny"
    run_gms("--threads", "2", "train", SHARED / "data" / "busi", "-o", out, "--name", "busi-tiny",
            "--segments", "lesion", "--max-train", "24", "--max-val", "6", "--augment-copies", "1", "--epochs", "4",
            "--warmup-epochs", "1", "--dice-samples", "1", "--batch-size", "8", check=True)
    assert (out / "card.json").is_file() and (out / "model.safetensors").is_file()
    return out


@pytest.fixture(scope="session")
def tiny_model_card(tiny_model) -> dict:
    return json.loads((tiny_model / "card.json").read_text())
