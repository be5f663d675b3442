"""Sample images for the README's first command and for trying the extension: read from the shared data folder
(``$GMS_SHARED``, else ``../shared`` beside the project) when it is there, else downloaded from a pinned URL into the
cache and verified by SHA-256 (a mismatch is an error and the file is removed).

The pin of a download is the SHA-256 of the upstream bytes. A shared copy may be stored differently (BUSI's RGB PNGs
whose three channels are equal are kept there as grayscale PNGs with the same pixel values), so it carries its own
``shared_sha256``. Downloads follow the weights' rules (weights.py): ``GMS_DOWNLOAD_BASE_URL`` fetches
``<base>/<filename>`` instead of the pinned URL, and ``GMS_OFFLINE=1`` turns a needed download into an error."""
from __future__ import annotations

from pathlib import Path

from . import GMSError
from .weights import (ENV_OFFLINE, PinnedFile, cache_root, download_file, download_url, offline, sha256_file,
                      shared_dir)

SAMPLES = {
    "busi-malignant-3": {
        "description": "BUSI breast ultrasound, malignant case 3 (a test-split image, CC0 1.0)",
        "relpath": "data/busi/images/malignant_3.png",
        "shared_sha256": "60998826a85b98530ef01aa125f27a8c2c3ab64e73505a181401132b9b1bd09c",
        "filename": "malignant_3.png",
        "sha256": "3489fd297564622b3f2d0301017d092dd03e4722caff26f03847df6d5dc2ce86",
        "size": 231692,
        "url": "https://github.com/yirutsai/Breast-ultrasound-dataset/raw/6c0fac8/data/malignant/images/"
               "malignant%20(3).png",
    },
    "hippocampus-025": {
        "description": "MSD Task04 hippocampus MRI volume 025 (a validation-split case, CC-BY-SA 4.0)",
        "relpath": "data/hippocampus/imagesTr/hippocampus_025.nii.gz",
        "filename": "hippocampus_025.nii.gz",
        "sha256": "9038fa9175ef4ac063e459e7e8545afcde7fc2bf2ec67d24b765057b2500b0c5",
        "url": "https://github.com/udacity/nd320-c3-3d-imaging-starter/raw/895fee6/data/TrainingSet/images/"
               "hippocampus_025.nii.gz",
    },
}


def fetch_sample(name: str, progress=None) -> Path:
    if name not in SAMPLES:
        raise GMSError(f"unknown sample '{name}' (known: {', '.join(SAMPLES)})")
    s = SAMPLES[name]
    shared = shared_dir()
    if shared is not None and (shared / s["relpath"]).is_file():
        p = shared / s["relpath"]
        if sha256_file(p) != s.get("shared_sha256", s["sha256"]):
            raise GMSError(f"sample {p} does not match its pinned SHA-256")
        return p
    pinned = PinnedFile(s["filename"], s["sha256"], s["url"], s.get("size"))
    dest = cache_root() / "samples" / pinned.name
    if dest.is_file() and sha256_file(dest) == pinned.sha256:
        return dest
    if offline():
        raise GMSError(f"sample {name} is not in the cache {dest.parent} and downloads are disabled ({ENV_OFFLINE}); "
                       f"get it from {pinned.url}")
    return Path(download_file(download_url(pinned), dest, pinned.sha256, progress, size=pinned.size))
