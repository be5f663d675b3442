"""One-off trials that each answered one question (see experiments/README.md); a package so that the trials that
import one another run as ``python -m experiments.NAME`` from the repository root."""
