"""Alias: the torch implementation of the flat-layout ops moved to :mod:`fastmaml.kernels.flat_torch`
(``fastmaml.reference`` holds only the MAML oracle, :mod:`fastmaml.reference.maml`)."""

import sys

from ..kernels import flat_torch

sys.modules[__name__] = flat_torch
