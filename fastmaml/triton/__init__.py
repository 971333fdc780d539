"""Triton kernels of the fused ops (docs/design.md §3.1).

The kernels live in :mod:`fastmaml.triton.ops`; importing that module raises ``ImportError`` when
triton is not installed. This package itself imports nothing, so it is always safe to import.
"""
