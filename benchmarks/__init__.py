"""Runnable measurements of GMSSegment (see benchmarks/README.md); a package so that scripts elsewhere can run as
``python -m`` from the repository root and import ``benchmarks.paired_difference``."""
