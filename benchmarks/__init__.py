"""The benchmark scripts, importable for the tests (``from benchmarks import client_cost``).

Run each from the repository root as ``python -m benchmarks.NAME`` or ``python benchmarks/NAME.py``.
"""
