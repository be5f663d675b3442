"""The Python packages the background worker needs in Slicer's Python, and what installing the missing ones takes
(no qt, no MRML, imports none of them: versions are read from the installed packages' metadata).

PyTorch is special: it comes from Slicer's PyTorch extension (``PyTorchUtils.PyTorchUtilsLogic.installTorch``, which
picks the build for the computer's GPU), and an installed PyTorch older than the minimum is never replaced while
Slicer runs (its libraries may already be loaded): the user upgrades it in the PyTorch Utils module. The module
(``GMSSegment.ensureDependencies``) asks once for everything else, as TotalSegmentator's Slicer extension does.
"""
from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .modelcard import ModelCard

TORCH_REQUIREMENT = "torch>=2.1"
#: Python packages the worker needs (torch comes from Slicer's PyTorch extension, SimpleITK ships with Slicer). Not
#: tqdm: the worker reports progress as JSON lines (``--progress json``) and never imports it.
REQUIREMENTS = (TORCH_REQUIREMENT, "numpy>=1.24", "SimpleITK>=2.2", "safetensors>=0.4", "scipy>=1.10", "pillow>=9")
#: needed only by models whose foundation autoencoder comes from diffusers
OPTIONAL_REQUIREMENTS = {"diffusers": ("diffusers>=0.27",)}


def parseRequirement(req: str) -> tuple[str, str | None, str | None]:
    """``(name, operator, version)`` of a simple pip requirement such as ``"torch>=2.1"``."""
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(>=|==|>|<=|<|~=)?\s*([0-9][0-9A-Za-z.+\-]*)?\s*$", req)
    if not m:
        raise ValueError(f"unsupported requirement {req!r}")
    return m.group(1), m.group(2), m.group(3)


def _versionTuple(text: str) -> tuple:
    parts = []
    for piece in re.split(r"[.+\-]", text):
        m = re.match(r"^(\d+)", piece)
        if not m:
            break
        parts.append(int(m.group(1)))
    return tuple(parts)


def satisfies(installed: str, op: str | None, wanted: str | None) -> bool:
    if not op or not wanted:
        return True
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        return Version(installed) in SpecifierSet(op + wanted, prereleases=True)
    except Exception:  # packaging missing or a local version it cannot parse: compare numerically
        a, b = _versionTuple(installed), _versionTuple(wanted)
        n = max(len(a), len(b))
        a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
        return {">=": a >= b, ">": a > b, "==": a == b, "<=": a <= b, "<": a < b, "~=": a >= b}[op]


def installedVersion(name: str) -> str | None:
    """The installed version of distribution ``name`` (from its metadata; nothing is imported), or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def missingRequirements(requirements: Iterable[str] = REQUIREMENTS) -> list[str]:
    """The requirements (pip syntax, e.g. ``"torch>=2.1"``) not satisfied in this Python, without importing them."""
    missing = []
    for req in requirements:
        name, op, wanted = parseRequirement(req)
        installed = installedVersion(name)
        if installed is None or not satisfies(installed, op, wanted):
            missing.append(req)
    return missing


def requirementsForCard(card: ModelCard | dict | None) -> list[str]:
    """REQUIREMENTS plus what a model card's foundation autoencoder needs (diffusers for ``diffusers-*`` models).
    ``card``: a ModelCard (a dict is read as one) or None."""
    reqs = list(REQUIREMENTS)
    foundation = ModelCard.coerce(card).foundation
    fname = (foundation if isinstance(foundation, str) else str(getattr(foundation, "name", None) or "")).lower()
    if fname.startswith("diffusers") or fname in ("autoencoderkl", "autoencodertiny"):
        reqs += list(OPTIONAL_REQUIREMENTS["diffusers"])
    return reqs


@dataclass
class InstallPlan:
    """What making ``requirements`` available takes: ``torch`` (the torch requirement to install through the PyTorch
    extension, when torch is not installed), ``torchTooOld`` (the installed torch version when it is older than the
    requirement: not to be installed over, see the module docstring), ``pip`` (the other missing requirements)."""

    requirements: list[str]
    torch: str | None = None
    torchTooOld: str | None = None
    pip: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Nothing to install and nothing too old."""
        return self.torch is None and self.torchTooOld is None and not self.pip

    @property
    def torchVersionRequirement(self) -> str:
        """The version part of the torch requirement (``">=2.1"``), as ``installTorch`` takes it."""
        req = next((r for r in self.requirements if parseRequirement(r)[0].lower() == "torch"), TORCH_REQUIREMENT)
        _, op, wanted = parseRequirement(req)
        return f"{op}{wanted}" if op and wanted else ""

    @property
    def packages(self) -> list[str]:
        """Everything that will be installed, for the one confirmation."""
        return ([f"PyTorch ({self.torch}, from the PyTorch extension)"] if self.torch else []) + list(self.pip)


def installPlan(requirements: Iterable[str], version: Callable[[str], str | None] | None = None) -> InstallPlan:
    """The :class:`InstallPlan` for ``requirements`` in this Python (``version(name)``: the installed version of a
    distribution or None; default :func:`installedVersion`)."""
    version = version or installedVersion
    plan = InstallPlan(list(requirements))
    for req in plan.requirements:
        name, op, wanted = parseRequirement(req)
        installed = version(name)
        if installed is not None and satisfies(installed, op, wanted):
            continue
        if name.lower() != "torch":
            plan.pip.append(req)
        elif installed is None:
            plan.torch = req
        else:
            plan.torchTooOld = installed
    return plan
