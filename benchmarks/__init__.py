"""Maintainers' benchmarks, outside the package users import: `python -m benchmarks.NAME` from the repository root."""
