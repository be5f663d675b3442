"""The latent cache of ``gms train``: image and mask latents of every training sample and its augmented copies, encoded
once by the frozen foundation model (copy 0 is the plain image) and kept on disk, so that training runs on latents
only."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from .augment import augment_pair
from .pipeline import to_model_input, train_autocast
from .tensorfile import save_safetensors


def code_image(labels: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Label indices (H, W) -> RGB float image with each segment's code colour on black."""
    allc = np.concatenate([np.zeros((1, 3), np.float32), codes.astype(np.float32)])
    return allc[labels]


def _resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """Label indices -> size x size by per-class bilinear weights and argmax (smooth, no aliasing)."""
    n = int(labels.max()) + 1
    onehot = torch.from_numpy(np.stack([labels == i for i in range(max(n, 2))]).astype(np.float32))[None]
    r = F.interpolate(onehot, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return r[0].argmax(0).numpy().astype(np.uint8)


class LatentCache:
    """Encoded latents of the (augmented) samples: image latents, mask latents and labels at the model size."""

    def __init__(self, img: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, names: list[str], copies: int):
        self.img, self.mask, self.labels, self.names, self.copies = img, mask, labels, names, copies

    @classmethod
    def build(cls, samples_fn, names: list[str], copies: int, foundation, size: int, codes: np.ndarray, seed: int,
              path: Path | None, log=print, batch: int = 16, precision: str = "fp32",
              progress=None) -> "LatentCache":
        if path is not None and path.is_file():
            t = load_file(str(path))
            log(f"latent cache: loaded {path.name} ({t['img'].shape[0]} entries)")
            return cls(t["img"], t["mask"], t["labels"], names, copies)
        rng = np.random.default_rng(seed)
        imgs, masks, labs = [], [], []
        pend_i, pend_m = [], []
        t0 = last_log = time.time()

        def flush():
            if not pend_i:
                return
            with torch.inference_mode(), train_autocast(torch.device("cpu"), precision):
                x = torch.cat(pend_i).contiguous(memory_format=torch.channels_last)
                y = to_model_input(np.stack(pend_m), size, "cpu")
                imgs.append(foundation.encode(x).to(torch.float16))
                masks.append(foundation.encode(y).to(torch.float16))
            pend_i.clear()
            pend_m.clear()

        total = len(names) * copies
        done = 0
        for name in names:
            for sample in samples_fn(name):
                for c in range(copies):
                    im, lab = (sample.image, sample.labels) if c == 0 else augment_pair(sample.image, sample.labels, rng)
                    lab_s = _resize_labels(lab, size)
                    pend_i.append(to_model_input(im[None], size, "cpu"))
                    pend_m.append(code_image(lab_s, codes))
                    labs.append(torch.from_numpy(lab_s))
                    if len(pend_i) >= batch:
                        flush()
            done += copies
            if progress is not None:
                progress(done, total)
            if time.time() - last_log > 30:
                last_log = time.time()
                log(f"latent cache: encoded {done}/{total} ({time.time() - t0:.0f} s)")
        flush()
        c = cls(torch.cat(imgs).contiguous(), torch.cat(masks).contiguous(), torch.stack(labs), names, copies)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_safetensors({"img": c.img, "mask": c.mask, "labels": c.labels}, path)
        log(f"latent cache: {c.img.shape[0]} entries in {time.time() - t0:.0f} s")
        return c
