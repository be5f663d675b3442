"""GMSSegment engine: Generative Medical Segmentation, headless (never imports qt).

Layout:
  autoencoders/  frozen foundation autoencoders behind one interface (TAEF2, diffusers AutoencoderKL / AutoencoderTiny)
  lmm.py         the latent mapping model (ResAttnUNet with deep supervision)
  model.py       a GMS model folder: LMM weights (safetensors) + card.json, and the foundation model it needs
  weights.py     resolving foundation weights: local folder, cache, or pinned download with SHA-256
  imageio.py     reading images/volumes with geometry (re-exports labelwrite's writers)
  labelwrite.py  writing label maps (and every image file) through atomicfile.py: atomic, synced, read back
  inputcheck.py  an input file checked before it is decoded (bytes present, gzip, NaN/Inf, memory; datalayout.py)
  pipeline.py    the one slice loop used by the CLI, the Slicer worker and batch jobs
  train.py, evaluate.py, metrics.py, benchmark.py, cli.py
"""

__version__ = "0.1.0"


class GMSError(Exception):
    """An error caused by the user's input (file, model, option). The CLI prints its message on one line."""
