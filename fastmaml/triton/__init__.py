"""Triton kernels of the fused ops (engine.md section 3).

The kernels live in :mod:`fastmaml.triton.ops`; importing that module raises ``ImportError`` when
triton is not installed. This package itself imports nothing, so it is always safe to import.
"""
