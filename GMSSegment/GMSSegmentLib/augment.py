"""Image-space augmentations of the GMS recipe, applied before encoding (numpy + torch, no torchvision):
flips (0.5 each), a random multiple of 90 degrees (0.5), colour jitter 0.1 (p 0.2), shift 0.15 / scale 0.1 /
rotate 20 degrees (p 0.4)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def augment_pair(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
    """image H x W x 3 float [0, 1], labels H x W uint8 -> augmented copies (same shapes unless rotated by 90)."""
    if rng.random() < 0.5:
        image, labels = image[:, ::-1], labels[:, ::-1]
    if rng.random() < 0.5:
        image, labels = image[::-1], labels[::-1]
    if rng.random() < 0.5:
        k = int(rng.integers(1, 4))
        image, labels = np.rot90(image, k), np.rot90(labels, k)
    if rng.random() < 0.2:
        b, c, s = (1 + rng.uniform(-0.1, 0.1) for _ in range(3))
        mean = image.mean()
        image = (image * b - mean) * c + mean
        grey = image.mean(axis=2, keepdims=True)
        image = np.clip(grey + (image - grey) * s, 0, 1)
    image, labels = np.ascontiguousarray(image, np.float32), np.ascontiguousarray(labels)
    if rng.random() < 0.4:
        image, labels = _affine(image, labels, rng)
    return image, labels


def _affine(image, labels, rng):
    ang = math.radians(rng.uniform(-20, 20))
    sc = 1 + rng.uniform(-0.1, 0.1)
    tx, ty = rng.uniform(-0.15, 0.15, size=2) * 2  # in normalised [-1, 1] coordinates
    cos, sin = math.cos(ang) / sc, math.sin(ang) / sc
    theta = torch.tensor([[cos, -sin, tx], [sin, cos, ty]], dtype=torch.float32)[None]
    img = torch.from_numpy(image).permute(2, 0, 1)[None]
    lab = torch.from_numpy(labels.astype(np.float32))[None, None]
    grid = F.affine_grid(theta, img.shape, align_corners=False)
    img = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    lab = F.grid_sample(lab, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return img[0].permute(1, 2, 0).numpy(), lab[0, 0].numpy().astype(np.uint8)
