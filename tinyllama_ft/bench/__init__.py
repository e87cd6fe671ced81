"""Benchmarks: the seed configuration against the default, side by side (`python -m tinyllama_ft bench`)."""

from .. import forward_to

__getattr__ = forward_to(__name__, "compare")  # the names of `tinyllama_ft.bench` from before the wings
