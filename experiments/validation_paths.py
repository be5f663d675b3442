"""Training's validation Dice (the LMM on the validation latents, decoded at the input size, against the labels resized
as the training cache resizes them) for one or more models, on validation latents encoded here in fp32 and on the same
latents rounded to fp16 (how the training cache stores them). Compare with the plain pass (``1_views/none``) of the
option table that ``gms postprocess`` / ``gms train`` print, which goes through the inference path.

    python experiments/validation_paths.py ../shared/data/kvasir-seg --models kvasir-polyp --weights-dir ../shared/models
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from GMSSegmentLib.autoencoders import load_foundation
from GMSSegmentLib.evaluate import validation_cases
from GMSSegmentLib.model import GMSModel, resolve_model_path
from GMSSegmentLib.pipeline import to_model_input
from GMSSegmentLib.train import _resize_labels, load_2d, validate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="2D data set folder with split.json")
    ap.add_argument("--models", nargs="+", required=True, help="installed names or model folders")
    ap.add_argument("--weights-dir", default=None)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    root = Path(a.data)
    foundation = load_foundation({"name": "taef2"}, weights_dir=a.weights_dir).to(memory_format=torch.channels_last)
    for ref in a.models:
        model = GMSModel.load(resolve_model_path(ref))
        model.attach_foundation(foundation)
        size, values = model.input_size, model.card["training"]["label_values"]
        codes = model.codes
        names = validation_cases(model.card, root)
        lat, labels = [], []
        with torch.inference_mode():
            for i in range(0, len(names), 16):
                samples = [load_2d(root, n, values, model.card.get("normalization")) for n in names[i:i + 16]]
                x = torch.cat([to_model_input(s.image[None], size, "cpu") for s in samples])
                lat.append(foundation.encode(x.contiguous(memory_format=torch.channels_last)))
                labels += [torch.from_numpy(_resize_labels(s.labels, size)) for s in samples]
        lat, labels = torch.cat(lat), torch.stack(labels)
        d32 = validate(model, lat, labels, codes, len(codes))
        d16 = validate(model, lat.half().float(), labels, codes, len(codes))
        plain = ((model.card.get("postprocess") or {}).get("validation_dice") or {}).get("1_views/none")
        print(f"{ref}: {len(names)} validation cases; training's validation Dice on fp32 latents {d32:.4f}, "
              f"on fp16-rounded latents {d16:.4f}; the card's plain pass through the inference path: {plain}", flush=True)


if __name__ == "__main__":
    main()
