"""Foundation autoencoders from diffusers: ``AutoencoderKL`` (the SD VAE of the GMS paper) and ``AutoencoderTiny``
(the TAESD family). diffusers is imported lazily, so the rest of the engine works without it.

Both wrappers keep the engine's contract (images N x 3 x H x W in [0, 1] in and out, frozen, eval) and produce the
latents a diffusion model of that family sees, i.e. what diffusers pipelines compute:

* ``AutoencoderKL``: diffusers wants images in [-1, 1] and returns a diagonal Gaussian posterior. ``encode`` returns
  ``(posterior.mean - shift_factor) * scaling_factor`` (the deterministic mean, never a sample; shift_factor is None,
  i.e. 0, for the SD VAE and scaling_factor 0.18215); ``encode_distribution`` returns that mean and
  ``posterior.std * scaling_factor``. ``decode`` undoes the affine map, decodes and maps [-1, 1] to [0, 1], clamped.
* ``AutoencoderTiny``: its ``encode`` also takes [-1, 1] (``EncoderTiny`` maps back to [0, 1] internally) and returns
  unscaled latents; its ``decode`` soft-clamps the latents and returns [-1, 1]. The wrapper applies the config's
  ``scaling_factor``/``shift_factor`` the same way as for KL (1.0 and 0.0 for the TAESD checkpoints, so the latents
  are the tiny encoder's own output) and maps the decoded image to [0, 1], clamped.

Per-channel statistics from the config (``latents_mean``/``latents_std``) are not applied: standardising latents
for the latent mapping model is the GMS model's business.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import GMSError
from .base import FoundationAutoencoder


def _import_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError as e:
        raise GMSError(f"this foundation model needs the 'diffusers' package, which is not installed ({e}); "
                       f"install it with: pip install diffusers") from None
    return diffusers


def _locate(path: str | Path, subfolder: str | None) -> tuple[str, str | None]:
    """A local folder with ``config.json`` directly or in ``vae/`` (a whole pipeline folder) is used as is; anything
    else is passed on to diffusers as a Hugging Face Hub id."""
    text = str(path)
    p = Path(text).expanduser()
    if p.is_dir():
        if subfolder is None and not (p / "config.json").is_file() and (p / "vae" / "config.json").is_file():
            subfolder = "vae"
        return str(p), subfolder
    if p.is_absolute() or text.startswith((".", "~")) or p.exists() or "\\" in text:
        raise GMSError(f"diffusers model folder {'is not a folder' if p.exists() else 'not found'}: {p}")
    return text, subfolder


def _load(cls_name: str, path: str | Path, subfolder: str | None, revision: str | None, torch_dtype):
    diffusers = _import_diffusers()
    cls = getattr(diffusers, cls_name)
    where, subfolder = _locate(path, subfolder)
    kwargs = {}
    if subfolder:
        kwargs["subfolder"] = subfolder
    if revision:
        kwargs["revision"] = revision
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    try:
        from diffusers.utils import is_accelerate_available
        if not is_accelerate_available():
            kwargs["low_cpu_mem_usage"] = False  # same behaviour, without diffusers' warning about accelerate
    except ImportError:
        pass
    try:
        model = cls.from_pretrained(where, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GMSError(f"cannot load diffusers {cls_name} from '{path}'"
                       f"{f' (subfolder {subfolder})' if subfolder else ''}: {first}") from None
    if not isinstance(model, cls):
        raise GMSError(f"'{path}' holds a {type(model).__name__}, not a diffusers {cls_name}")
    return model, subfolder


def _diffusers_path(spec: dict, weights_dir: str | Path | None) -> str:
    """A relative path that does not exist as given is looked up under ``weights_dir``."""
    path = str(spec["path"])
    if weights_dir and not Path(path).expanduser().exists() and not Path(path).is_absolute():
        candidate = Path(weights_dir).expanduser() / path
        if candidate.exists():
            return str(candidate)
    return path


class _DiffusersAutoencoder(FoundationAutoencoder):
    _cls_name = ""
    needs_path = True

    def __init__(self, vae, source: str, subfolder: str | None = None, revision: str | None = None):
        super().__init__()
        self.vae = vae
        self.source = source
        self.subfolder = subfolder
        self.revision = revision
        cfg = vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.scaling_factor = float(getattr(cfg, "scaling_factor", None) or 1.0)
        shift = getattr(cfg, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0
        self.freeze()

    @classmethod
    def from_pretrained(cls, path: str | Path, subfolder: str | None = None, revision: str | None = None,
                        torch_dtype=None):
        vae, subfolder = _load(cls._cls_name, path, subfolder, revision, torch_dtype)
        return cls(vae, str(path), subfolder, revision)

    @classmethod
    def from_spec(cls, spec: dict, weights_dir=None, progress=None):
        return cls.from_pretrained(_diffusers_path(spec, weights_dir), subfolder=spec.get("subfolder"),
                                   revision=spec.get("revision"))

    @classmethod
    def fingerprint(cls, spec: dict, weights_dir=None, progress=None) -> dict[str, str]:
        """SHA-256 of the weight files and ``config.json``."""
        from ..weights import sha256_file
        files = model_files(_diffusers_path(spec, weights_dir), spec.get("subfolder"), spec.get("revision"))
        return {p.name: sha256_file(p) for p in files}

    # helpers -----------------------------------------------------------------------------------------------------
    def _dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _check(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images N x 3 x H x W, got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.downscale or w % self.downscale:
            raise ValueError(f"image size {h}x{w} is not a multiple of {self.downscale}")

    def _to_model(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images)
        return (images.to(self._dtype()) * 2.0 - 1.0)

    def _scale(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift_factor) * self.scaling_factor

    def _unscale(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scaling_factor + self.shift_factor

    @staticmethod
    def _to_unit(decoded: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return ((decoded + 1.0) * 0.5).clamp(0.0, 1.0).to(like.dtype if like.is_floating_point() else torch.float32)

    def describe(self) -> dict:
        d = super().describe()
        d.update(path=self.source, scaling_factor=self.scaling_factor, shift_factor=self.shift_factor)
        if self.subfolder:
            d["subfolder"] = self.subfolder
        if self.revision:
            d["revision"] = self.revision
        return d


class DiffusersKL(_DiffusersAutoencoder):
    """diffusers ``AutoencoderKL`` (e.g. the SD VAE ``stabilityai/sd-vae-ft-mse``); latents are posterior means."""

    name = "diffusers-kl"
    aliases = ("autoencoderkl",)
    _cls_name = "AutoencoderKL"

    def __init__(self, vae, source: str, subfolder: str | None = None, revision: str | None = None):
        super().__init__(vae, source, subfolder, revision)
        self.downscale = 2 ** (len(vae.config.block_out_channels) - 1)

    def _posterior(self, images: torch.Tensor):
        x = self._to_model(images)
        return self.vae.encode(x).latent_dist

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._scale(self._posterior(images).mean).to(images.dtype)

    def encode_distribution(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        post = self._posterior(images)
        return self._scale(post.mean).to(images.dtype), (post.std * self.scaling_factor).to(images.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = self._unscale(latents.to(self._dtype()))
        return self._to_unit(self.vae.decode(z).sample, latents)


class DiffusersTiny(_DiffusersAutoencoder):
    """diffusers ``AutoencoderTiny`` (TAESD family, e.g. ``madebyollin/taesd``); deterministic encoder."""

    name = "diffusers-tiny"
    aliases = ("autoencodertiny",)
    _cls_name = "AutoencoderTiny"

    def __init__(self, vae, source: str, subfolder: str | None = None, revision: str | None = None):
        super().__init__(vae, source, subfolder, revision)
        cfg = vae.config
        down = 2 ** (len(cfg.encoder_block_out_channels) - 1)
        up = int(cfg.upsampling_scaling_factor) ** (len(cfg.decoder_block_out_channels) - 1)
        if down != up:
            raise GMSError(f"AutoencoderTiny at '{source}' downsamples by {down} but upsamples by {up}")
        self.downscale = down

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = self._to_model(images)
        return self._scale(self.vae.encode(x).latents).to(images.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = self._unscale(latents.to(self._dtype()))
        return self._to_unit(self.vae.decode(z).sample, latents)


def model_files(path: str | Path, subfolder: str | None = None, revision: str | None = None) -> list[Path]:
    """The config and weight files of a diffusers model (a local folder, or a Hub id already in the local Hub cache),
    for fingerprinting. Raises GMSError when they cannot be found without a download."""
    where, subfolder = _locate(path, subfolder)
    folder = Path(where)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download
            folder = Path(snapshot_download(where, revision=revision, local_files_only=True))
        except Exception as e:  # noqa: BLE001 - any failure means: not available locally
            raise GMSError(f"cannot fingerprint '{path}': not a local folder and not in the Hugging Face cache "
                           f"({type(e).__name__})") from None
    if subfolder:
        folder = folder / subfolder
    exts = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.name == "config.json" or p.name.endswith(exts)))
    if not any(p.name != "config.json" for p in files):
        raise GMSError(f"no weight files found in {folder}")
    return files


__all__ = ["DiffusersKL", "DiffusersTiny", "model_files"]
