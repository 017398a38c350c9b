"""Benchmarks of pneumo against a typical PyTorch pipeline: not part of the installed package."""
