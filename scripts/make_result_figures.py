"""Result figures for the extension's catalog page (EXTENSION_SCREENSHOTURLS), drawn from real engine outputs.

Each bundled model is run on its sample through the ``gms`` command line (``gms sample``, ``gms segment``, ``gms info``:
the code path a user runs), and the figure shows the input with the model's segments overlaid, coloured as in the model
card. These are figures made from engine outputs with numpy and Pillow, not screenshots of the Slicer application.

* ``busi-lesion-result-2d.png``: the busi-lesion model on BUSI malignant case 3 (the ``busi-malignant-3`` sample).
* ``hippocampus-result-3d.png``: the hippocampus model on MSD Task04 volume 025 (the ``hippocampus-025`` sample):
  axial, coronal and sagittal slices through the volume, and a shaded surface rendering of the 3D label map.

With ``--busi-reference`` / ``--hippocampus-reference`` the reference mask is outlined in white and the Dice score of
each segment against it is printed under the figure. The committed figures were made with::

    .venv/bin/python scripts/make_result_figures.py \\
        --busi-reference ../shared/data/busi/masks/malignant_3.png \\
        --hippocampus-reference ../shared/data/hippocampus/labelsTr/hippocampus_025.nii.gz
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

REPO = Path(__file__).resolve().parent.parent
BACKGROUND = (16, 16, 16)
TEXT = (235, 235, 235)
REFERENCE = (255, 255, 255)
FILL_ALPHA = 0.35


# -- running the engine ---------------------------------------------------------------------------------------------------
def gms(*args: str, threads: int | None = None) -> str:
    """Run the ``gms`` command line in this interpreter and return its standard output."""
    cmd = [sys.executable, "-m", "GMSSegmentLib"] + (["--threads", str(threads)] if threads else []) + list(args)
    env_path = str(REPO / "GMSSegment")  # the engine, also when it is not installed in this interpreter
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (env_path, os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr.strip()}")
    return done.stdout


def run_model(model: str, sample: str, workdir: Path, threads: int | None) -> tuple[Path, Path, list[dict]]:
    """The sample's path, the label map ``gms segment`` wrote for it, and the model's segments (name, label, colour)."""
    source = Path(gms("sample", sample).strip().splitlines()[-1])
    output = workdir / f"{model}.nrrd"
    gms("segment", str(source), "--model", model, "-o", str(output), "--progress", "none", threads=threads)
    segments = json.loads(gms("info", model))["segments"]
    return source, output, segments


# -- drawing --------------------------------------------------------------------------------------------------------------
def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def window(arr: np.ndarray) -> np.ndarray:
    """8-bit grey values: 8-bit input as it is, anything else windowed between its 0.5 and 99.5 percentiles."""
    if arr.dtype == np.uint8:
        return arr
    lo, hi = np.percentile(arr, [0.5, 99.5])
    return (np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def rgb255(color) -> np.ndarray:
    return np.round(np.asarray(color, dtype=np.float64) * 255)


def outline(mask: np.ndarray, width: int) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)


def overlay(grey: np.ndarray, labels: np.ndarray, segments: list[dict], size: tuple[int, int],
            reference: np.ndarray | None = None) -> Image.Image:
    """``grey`` (8 bit) and ``labels`` on the same grid, shown at ``size`` (width, height): each segment filled in its
    colour and outlined; the reference, if given, outlined in white."""
    base = np.asarray(Image.fromarray(grey).convert("RGB").resize(size, Image.BILINEAR), dtype=np.float64)
    lab = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize(size, Image.NEAREST))
    for s in segments:
        mask = lab == s["label"]
        color = rgb255(s["color"])
        base[mask] = (1 - FILL_ALPHA) * base[mask] + FILL_ALPHA * color
        base[outline(mask, 2)] = color
    if reference is not None:
        ref = np.asarray(Image.fromarray(reference.astype(np.uint8)).resize(size, Image.NEAREST))
        for value in np.unique(ref[ref > 0]):
            base[outline(ref == value, 1)] = REFERENCE
    return Image.fromarray(base.astype(np.uint8))


def letters(img: Image.Image, top: str, bottom: str, left: str, right: str) -> Image.Image:
    """Orientation letters at the middle of each edge."""
    d, f = ImageDraw.Draw(img), font(13)
    w, h = img.size
    for text, (x, y), anchor in ((top, (w / 2, 3), "mt"), (bottom, (w / 2, h - 3), "mb"),
                                 (left, (4, h / 2), "lm"), (right, (w - 4, h / 2), "rm")):
        d.text((x, y), text, fill=(255, 220, 90), font=f, anchor=anchor, stroke_width=2, stroke_fill=(0, 0, 0))
    return img


def compose(panels: list[tuple[Image.Image, str]], title: str, legend: list[tuple[tuple, str, bool]],
            notes: list[str]) -> Image.Image:
    """Panels side by side with a caption under each, a title and legend above, and note lines below."""
    gap, cap_h, head_h, note_h = 12, 22, 56, 20
    cell_h = max(p.size[1] for p, _ in panels)
    width = sum(p.size[0] for p, _ in panels) + gap * (len(panels) + 1)
    height = head_h + cell_h + cap_h + note_h * len(notes) + gap
    fig = Image.new("RGB", (width, height), BACKGROUND)
    d = ImageDraw.Draw(fig)
    d.text((gap, 8), title, fill=TEXT, font=font(16))
    x = gap
    for color, text, is_line in legend:
        if is_line:
            d.rectangle((x, 41, x + 16, 42), fill=color)
        else:
            d.rectangle((x, 34, x + 16, 48), fill=tuple(int(c) for c in color), outline=TEXT)
        d.text((x + 22, 41), text, fill=TEXT, font=font(13), anchor="lm")
        x += 22 + int(d.textlength(text, font=font(13))) + 18
    x = gap
    for panel, caption in panels:
        y = head_h + (cell_h - panel.size[1]) // 2
        fig.paste(panel, (x, y))
        d.text((x + panel.size[0] / 2, head_h + cell_h + 4), caption, fill=TEXT, font=font(13), anchor="mt")
        x += panel.size[0] + gap
    for i, note in enumerate(notes):
        d.text((gap, head_h + cell_h + cap_h + 4 + i * note_h), note, fill=(190, 190, 190), font=font(12))
    return fig


def legend_for(segments: list[dict], reference: bool) -> list[tuple[tuple, str, bool]]:
    items = [(tuple(rgb255(s["color"])), f"{s['name']} (model output)", False) for s in segments]
    return items + ([(REFERENCE, "reference mask", True)] if reference else [])


def dice_notes(labels: np.ndarray, reference: np.ndarray | None, segments: list[dict], ref_values: dict) -> list[str]:
    if reference is None:
        return []
    from GMSSegmentLib.metrics import dice

    scores = [f"{s['name']} {dice(labels == s['label'], reference == ref_values[s['label']]):.3f}" for s in segments]
    return ["Dice against the reference mask: " + ", ".join(scores)]


def save(fig: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.quantize(colors=255, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"{path} ({path.stat().st_size // 1024} KB)")


# -- 2D -------------------------------------------------------------------------------------------------------------------
def figure_2d(source: Path, output: Path, segments: list[dict], reference_path: Path | None) -> Image.Image:
    grey = np.asarray(Image.open(source).convert("L"))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(output)))
    assert labels.shape == grey.shape, (labels.shape, grey.shape)
    reference = None
    if reference_path is not None:
        reference = (np.asarray(Image.open(reference_path).convert("L")) > 127).astype(np.uint8)
    height = 330
    size = (round(grey.shape[1] * height / grey.shape[0]), height)
    panels = [(Image.fromarray(grey).convert("RGB").resize(size, Image.BILINEAR), "input"),
              (overlay(grey, labels, segments, size, reference), "gms segment --model busi-lesion")]
    notes = dice_notes(labels, reference, segments, {s["label"]: 1 for s in segments})
    return compose(panels, f"busi-lesion model on BUSI {source.name} ({grey.shape[1]} x {grey.shape[0]} px)",
                   legend_for(segments, reference is not None), notes)


# -- 3D -------------------------------------------------------------------------------------------------------------------
def lps(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Voxels (z, y, x) with x towards the patient's left, y posterior, z superior; spacing (z, y, x)."""
    img = sitk.DICOMOrient(img, "LPS")
    return sitk.GetArrayFromImage(img), np.array(img.GetSpacing()[::-1])


def best_slice(labels: np.ndarray, axis: int, values: list[int]) -> int:
    """The slice along ``axis`` that shows the most segments, and of those the largest labelled area."""
    moved = np.moveaxis(labels, axis, 0).reshape(labels.shape[axis], -1)
    present = sum((moved == v).any(axis=1).astype(np.int64) for v in values)
    area = (moved > 0).sum(axis=1)
    return int(np.lexsort((area, present))[-1])


def render_surface(labels: np.ndarray, spacing: np.ndarray, segments: list[dict], view: np.ndarray,
                   size: int) -> Image.Image:
    """A shaded surface of the label map seen from direction ``view`` (LPS, from the object towards the eye), by ray
    marching the smoothed segment masks to their 0.5 level; superior is up."""
    fields = np.stack([ndimage.gaussian_filter((labels == s["label"]).astype(np.float32), 0.8) for s in segments])
    occupancy = fields.max(axis=0)
    grads = np.gradient(occupancy, *spacing)  # d/dz, d/dy, d/dx in mm
    # camera frame in physical (x, y, z) = (L, P, S) millimetres
    eye = view / np.linalg.norm(view)
    d = -eye
    right = np.cross(d, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, d)
    zyx = np.argwhere(labels > 0)
    lo, hi = zyx.min(axis=0) * spacing, zyx.max(axis=0) * spacing
    center_xyz = ((lo + hi) / 2)[::-1]
    radius = np.linalg.norm((hi - lo) / 2) + 3 * spacing.max()
    u = np.linspace(-radius, radius, size)
    uu, vv = np.meshgrid(u, -u)  # rows from top (up) to bottom
    plane = center_xyz + uu[..., None] * right + vv[..., None] * up  # (size, size, 3) x,y,z
    steps = np.linspace(-radius, radius, int(2 * radius / (0.25 * spacing.min())) + 1)
    hit_t = np.full((size, size), np.nan)
    prev = np.zeros((size, size), dtype=np.float32)
    for i, t in enumerate(steps):  # front (eye side) to back
        pts = plane + t * d  # t runs along d, from the eye side
        idx = (pts[..., ::-1] / spacing).reshape(-1, 3).T
        val = ndimage.map_coordinates(occupancy, idx, order=1, mode="constant").reshape(size, size)
        new = np.isnan(hit_t) & (val >= 0.5)
        if i and new.any():
            frac = np.clip((0.5 - prev[new]) / np.maximum(val[new] - prev[new], 1e-6), 0, 1)
            hit_t[new] = steps[i - 1] + frac * (t - steps[i - 1])
        prev = val
    hit = ~np.isnan(hit_t)
    pts = plane[hit] + hit_t[hit][:, None] * d
    idx = (pts[:, ::-1] / spacing).T
    normal = -np.stack([ndimage.map_coordinates(g, idx, order=1) for g in grads[::-1]], axis=1)  # x, y, z
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-9)
    light = eye + 0.6 * up - 0.3 * right
    light /= np.linalg.norm(light)
    diffuse = np.clip(normal @ light, 0, 1)
    specular = np.clip(normal @ ((light + eye) / np.linalg.norm(light + eye)), 0, 1) ** 24
    which = np.argmax(np.stack([ndimage.map_coordinates(f, idx, order=1) for f in fields]), axis=0)
    colors = np.stack([rgb255(s["color"]) for s in segments])[which]
    shade = (0.25 + 0.75 * diffuse)[:, None] * colors + 60 * specular[:, None]
    out = np.zeros((size, size, 3))
    out[...] = BACKGROUND
    out[hit] = np.clip(shade, 0, 255)
    return Image.fromarray(out.astype(np.uint8))


def figure_3d(source: Path, output: Path, segments: list[dict], reference_path: Path | None) -> Image.Image:
    image, spacing = lps(sitk.ReadImage(str(source)))
    labels, _ = lps(sitk.ReadImage(str(output)))
    assert labels.shape == image.shape, (labels.shape, image.shape)
    reference = lps(sitk.ReadImage(str(reference_path)))[0] if reference_path is not None else None
    grey = window(image.astype(np.float32))
    values = [s["label"] for s in segments]
    zoom = 5
    panels = []
    # (axis, name, slice -> 2D array with the top row first, letters top/bottom/left/right)
    views = [(0, "axial", lambda a, k: a[k], "APRL"),
             (1, "coronal", lambda a, k: a[::-1, k, :], "SIRL"),
             (2, "sagittal", lambda a, k: a[::-1, :, k], "SIAP")]
    for axis, name, cut, lt in views:
        k = best_slice(labels, axis, values)
        rows, cols = [a for a in range(3) if a != axis]
        size = (round(image.shape[cols] * spacing[cols] / spacing.min() * zoom),
                round(image.shape[rows] * spacing[rows] / spacing.min() * zoom))
        ref = cut(reference, k) if reference is not None else None
        panel = overlay(cut(grey, k), cut(labels, k), segments, size, ref)
        panels.append((letters(panel, *lt), f"{name}, slice {k + 1} of {image.shape[axis]}"))
    height = max(p.size[1] for p, _ in panels)
    render = render_surface(labels, spacing, segments, np.array([1.0, -0.35, 0.45]), height)
    panels.append((render, "3D label map, from front left above"))
    notes = dice_notes(labels, reference, segments, {v: v for v in values})
    shape = " x ".join(str(n) for n in image.shape[::-1])
    return compose(panels, f"hippocampus model on MSD Task04 {source.name.split('.')[0]} ({shape} voxels)",
                   legend_for(segments, reference is not None), notes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "Resources" / "Screenshots", help="output folder")
    p.add_argument("--busi-reference", type=Path, help="reference mask of the BUSI sample (outlined, Dice printed)")
    p.add_argument("--hippocampus-reference", type=Path, help="reference labels of the hippocampus sample")
    p.add_argument("--threads", type=int, help="CPU threads for gms segment")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO / "GMSSegment"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source, output, segments = run_model("busi-lesion", "busi-malignant-3", work, args.threads)
        save(figure_2d(source, output, segments, args.busi_reference), args.out / "busi-lesion-result-2d.png")
        source, output, segments = run_model("hippocampus", "hippocampus-025", work, args.threads)
        save(figure_3d(source, output, segments, args.hippocampus_reference), args.out / "hippocampus-result-3d.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
