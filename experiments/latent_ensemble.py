"""Ensembles of LMMs on one encoder latent, scored on the first model's validation cases (never the test list).

Each model maps the same encoded image latent to a mask latent (with its own latent statistics); the ensemble
averages the predicted mask latents and decodes once, so it costs one encoder and one decoder pass whatever the
number of members (the LMM is small beside TAEF2). Prints each model alone and every combination of two or more,
all by one plain pass at the input size, as ``gms evaluate --no-tta --no-postprocess --resolution model`` scores it.

    python -m experiments.latent_ensemble ../shared/data/busi --weights-dir ../shared/models \\
        --models busi-lesion old/busi-s3 runs/busi15/busi-lesion

Models are model folders or installed names of one foundation model and input size.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from GMSSegmentLib import pipeline
from GMSSegmentLib.evaluate import validation_cases
from GMSSegmentLib.model import GMSModel
from GMSSegmentLib.modelpaths import resolve_model_path
from experiments.greedy_soup import score as plain_pass_dice

#: the members beside the evaluated model (its own LMM comes first); set per combination
EXTRA: list[GMSModel] = []


@torch.inference_mode()
def _ensemble_latents(self, x: torch.Tensor) -> torch.Tensor:
    """SliceSegmenter.predict_latents with the EXTRA members' predictions averaged in (fp32 throughout)."""
    z = self.model.foundation.encode(x).float()
    outs = [m.denorm_mask(m.lmm(m.norm_image(z), final_only=True).float()) for m in [self.model, *EXTRA]]
    return sum(outs) / len(outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="the data set the models were trained on")
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--weights-dir", default=None)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    root = Path(a.data)
    models = [resolve_model_path(m) for m in a.models]
    cases = validation_cases(json.loads((models[0] / "card.json").read_text()), root)
    print(f"{len(cases)} validation cases of {root}; one plain pass at the model's input size")
    pipeline.SliceSegmenter.predict_latents = _ensemble_latents
    members = [GMSModel.load(p).to(memory_format=torch.channels_last) for p in models]  # loaded once, for EXTRA
    for k in range(1, len(models) + 1):
        for combo in itertools.combinations(range(len(models)), k):
            EXTRA[:] = [members[i] for i in combo[1:]]
            d = plain_pass_dice(models[combo[0]], root, a.weights_dir, cases)
            print(f"{d:.4f}  {' + '.join(a.models[i] for i in combo)}", flush=True)


if __name__ == "__main__":
    main()
