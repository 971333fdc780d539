"""Alias: the torch implementation of the CG ops moved to :mod:`fastmaml.kernels.cg_torch`
(``fastmaml.reference`` holds only the MAML oracle, :mod:`fastmaml.reference.maml`)."""

import sys

from ..kernels import cg_torch

sys.modules[__name__] = cg_torch
