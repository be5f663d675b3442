"""Training / evaluation data sets.

2D: a folder with ``images/<name>.<ext>``, ``masks/<name>.png`` and ``split.json`` ({"train": [...], "test": [...],
optionally "val"}), like BUSI and Kvasir-SEG. Masks are binary (>127) or hold label values.
3D: a folder with ``imagesTr/<case>.nii.gz``, ``labelsTr/<case>.nii.gz`` and ``split.json``, like the MSD Hippocampus;
volumes are sliced along an axis and every slice is one sample.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

from . import GMSError
from .formats import IMAGE_2D_EXTENSIONS, VOLUME_EXTENSIONS
from .imageio import read_image
from .inputcheck import read_verified
from .normalization import DEFAULT as PHOTO, apply_range, intensity_range
from .orientation import orientation_code, reorientation


@dataclass
class Sample:
    name: str          # case name (3D: "<case>:<slice index>")
    image: np.ndarray  # H x W x 3 float32 in [0, 1]
    labels: np.ndarray  # H x W uint8 label values (0 = background)


def detect_layout(root: Path) -> str:
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "2d"
    if (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir():
        return "3d"
    raise GMSError(f"{root} is not a data set folder (expected images/ + masks/ or imagesTr/ + labelsTr/)")


def read_split(root: Path) -> dict[str, list[str]]:
    p = root / "split.json"
    if not p.is_file():
        raise GMSError(f"{root} has no split.json")
    return json.loads(p.read_text())


#: the training settings that decide a data set's training and validation cases (``split_names``' parameters; a
#: model card's ``training.config`` holds them, so the cases a model was selected on can be found again)
SPLIT_SETTINGS = ("train_list", "val_list", "val_fraction", "max_train", "max_val", "seed", "split_seed",
                  "negative_list")


def split_names(root: Path, train_list: str = "train", val_list: str | None = None, val_fraction: float = 0.1,
                max_train: int | None = None, max_val: int | None = None, seed: int = 0,
                split_seed: int | None = None, negative_list: str | None = None) -> tuple[list[str], list[str]]:
    """The training and validation cases of the data set at ``root`` (sorted names): split.json's list ``train_list``
    and its list ``val_list``, or without one a part ``val_fraction`` carved from the training list, deterministically
    by ``split_seed`` (None: ``seed``); each cut to its first ``max_train`` / ``max_val`` names when given.
    ``negative_list``: a list of cases without any segment (empty masks, e.g. normal images): the same fraction of it
    is carved for validation (by its own draw, so the cases of ``train_list`` and their carve are unchanged) and the
    rest trained on. The defaults are ``gms train``'s (``options.TrainConfig``)."""
    split = read_split(root)
    if train_list not in split:
        raise GMSError(f"split.json of {root} has no list '{train_list}' (has {sorted(split)})")
    train = sorted(split[train_list])
    if val_list:
        if val_list not in split:
            raise GMSError(f"split.json of {root} has no list '{val_list}'")
        val = sorted(split[val_list])
    else:  # carve a validation part from the training list, deterministically
        rng = np.random.default_rng((seed if split_seed is None else split_seed) + 12345)
        perm = rng.permutation(len(train))
        n_val = max(1, int(round(len(train) * val_fraction)))
        val = sorted(train[i] for i in perm[:n_val])
        train = sorted(train[i] for i in perm[n_val:])
    if max_train:
        train = train[:max_train]
    if max_val:
        val = val[:max_val]
    if negative_list:
        neg_train, neg_val = negative_names(root, negative_list, val_fraction,
                                            seed if split_seed is None else split_seed)
        train, val = sorted(train + neg_train), sorted(val + neg_val)
    overlap = set(train) & set(val)
    if overlap:
        raise GMSError(f"train and validation lists overlap: {sorted(overlap)[:5]}")
    return train, val


def negative_names(root: Path, negative_list: str, val_fraction: float = 0.1, seed: int = 0
                   ) -> tuple[list[str], list[str]]:
    """split.json's list ``negative_list`` (cases without any segment) -> (training part, validation part): the
    validation part is ``val_fraction`` of it (at least one case), drawn by ``seed``."""
    split = read_split(root)
    if negative_list not in split:
        raise GMSError(f"split.json of {root} has no list '{negative_list}' (has {sorted(split)})")
    names = sorted(split[negative_list])
    if not names:
        return [], []
    perm = np.random.default_rng(seed + 54321).permutation(len(names))
    n_val = max(1, int(round(len(names) * val_fraction)))
    return sorted(names[i] for i in perm[n_val:]), sorted(names[i] for i in perm[:n_val])


def find_image(root: Path, name: str) -> Path:
    for ext in IMAGE_2D_EXTENSIONS:
        p = root / "images" / f"{name}{ext}"
        if p.is_file():
            return p
    raise GMSError(f"no image for case '{name}' in {root / 'images'}")


def load_mask(root: Path, name: str, label_values=(255,)) -> np.ndarray:
    """``masks/<name>.png`` -> segment indices 1..n (binary masks: > 127 is segment 1)."""
    m = np.asarray(Image.open(root / "masks" / f"{name}.png").convert("L"))
    labels = np.zeros(m.shape, np.uint8)
    if tuple(label_values) == (255,):
        labels[m > 127] = 1
    else:
        for i, v in enumerate(label_values, start=1):
            labels[m == v] = i
    return labels


def load_2d(root: Path, name: str, label_values=(255,), normalization: dict | None = None) -> Sample:
    """One 2D case for training: the image read and normalised as inference reads and normalises an image file
    (``read_image`` and the card's normalisation, photo by default), gray repeated to RGB, and its mask. Another
    decoder would train the model on other pixels than it meets in use: PIL and ITK decode the same Kvasir JPEG to
    pixels up to ~50 grey levels apart (mostly the half-resolution chroma planes), which cost the Kvasir model 0.005
    validation Dice."""
    img = read_image(find_image(root, name)).array[0]
    img = apply_range(img, *intensity_range(img, normalization or PHOTO))
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return Sample(name, img, load_mask(root, name, label_values))


def volume_path(root: Path, sub: str, case: str) -> Path:
    for ext in VOLUME_EXTENSIONS:
        p = root / sub / f"{case}{ext}"
        if p.is_file():
            return p
    raise GMSError(f"no volume for case '{case}' in {root / sub}")


def volume_orientation(root: Path, case: str) -> str | None:
    """Orientation code (see orientation.py) of a case's image, read from its header only."""
    r = sitk.ImageFileReader()
    r.SetFileName(str(volume_path(root, "imagesTr", case)))
    r.ReadImageInformation()
    return orientation_code(r.GetDirection()) if r.GetDimension() == 3 else None


def load_3d(root: Path, case: str, normalization: dict, axis: int = 0, label_values=(1, 2),
            orientation: str | None = None) -> list[Sample]:
    """All slices of one case along ``axis`` of the (z, y, x) array, after permuting/flipping the volume into
    ``orientation`` when one is given (the model's; a volume too oblique to name is used as stored)."""
    img_s = read_verified(str(volume_path(root, "imagesTr", case)))  # refuses what read_image refuses to read
    img = sitk.GetArrayFromImage(img_s).astype(np.float32)
    lab = sitk.GetArrayFromImage(read_verified(str(volume_path(root, "labelsTr", case))))
    if orientation:
        source = orientation_code(img_s.GetDirection())
        if source is not None:
            r = reorientation(source, orientation)
            img, lab = np.ascontiguousarray(r.apply(img)), np.ascontiguousarray(r.apply(lab))
    lo, hi = intensity_range(img, normalization)
    img = np.moveaxis(apply_range(img, lo, hi), axis, 0)
    lab = np.moveaxis(lab, axis, 0)
    labels = np.zeros(lab.shape, np.uint8)
    for i, v in enumerate(label_values, start=1):
        labels[lab == v] = i
    return [Sample(f"{case}:{k}", np.repeat(img[k][..., None], 3, axis=2), labels[k]) for k in range(img.shape[0])]
