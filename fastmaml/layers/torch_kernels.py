"""The torch implementation of every layer kernel, under the names this module has always had.

Each layer family keeps its own torch implementation, with its math (:mod:`.conv`,
:mod:`.batchnorm`, :mod:`.linear`, :mod:`.activation`, :mod:`.pooling`, :mod:`.loss`); this module
gathers them into one namespace for tests and benchmarks (tests/test_layers.py checks them against
autograd's double backward; the C++ and Triton kernels are checked against them). It is not the
MAML oracle (that is :mod:`fastmaml.reference.maml`).
"""

from __future__ import annotations

from .activation import act_backward, act_forward  # noqa: F401
from .batchnorm import (bn_act_pool_backward, bn_act_pool_forward, bn_act_pool_rbackward,  # noqa: F401
                        bn_act_pool_rforward)
from .conv import conv2d_backward, conv2d_backward_per_task, conv2d_forward  # noqa: F401
from .linear import linear_backward, linear_forward, linear_rbackward, linear_rforward  # noqa: F401
from .loss import (cross_entropy_forward_backward, cross_entropy_rbackward, mse_forward_backward,  # noqa: F401
                   mse_rbackward)
from .pooling import (global_mean_backward, global_mean_forward, maxpool_forward, maxpool_gather,  # noqa: F401
                      maxpool_scatter)
from .tensors import Opt  # noqa: F401

# private helpers some kernel tests reuse (tests/test_layers_triton.py)
from .activation import act_slope as _act_slope  # noqa: E402,F401
from .batchnorm import _stats_view, _xh  # noqa: E402,F401
from .pooling import pool_forward as _pool_fwd, pool_gather as _pool_gather, pool_scatter as _pool_scatter  # noqa: E402,F401,E501
from .tensors import add_opt as _add  # noqa: E402,F401
