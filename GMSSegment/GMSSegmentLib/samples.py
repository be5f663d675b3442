"""Sample images for the README's first command and for trying the extension: read from the shared data folder
(``$GMS_SHARED``, else ``../shared`` beside the project) when it is there, else downloaded from a pinned URL into the
cache and verified by SHA-256 (a mismatch is an error and the file is removed)."""
from __future__ import annotations

from pathlib import Path

from . import GMSError
from .weights import cache_root, download_file, sha256_file, shared_dir

SAMPLES = {
    "busi-malignant-3": {
        "description": "BUSI breast ultrasound, malignant case 3 (a test-split image, CC0 1.0)",
        "relpath": "data/busi/images/malignant_3.png",
        "filename": "malignant_3.png",
        "sha256": "60998826a85b98530ef01aa125f27a8c2c3ab64e73505a181401132b9b1bd09c",
        "url": "https://github.com/yirutsai/Breast-ultrasound-dataset/raw/6c0fac8/data/images/malignant%20(3).png",
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
        if sha256_file(p) != s["sha256"]:
            raise GMSError(f"sample {p} does not match its pinned SHA-256")
        return p
    dest = cache_root() / "samples" / s["filename"]
    if dest.is_file() and sha256_file(dest) == s["sha256"]:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(download_file(s["url"], dest, s["sha256"], progress))
