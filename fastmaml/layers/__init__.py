"""Task-batched layers and the fused path that runs supported models with them.

One module per layer family, each with its four passes (forward, backward, R-forward,
R-backward: the math in its docstring), its torch implementation, the C++ ops it declares (fake
kernels) and its runner node (a frozen dataclass owning the passes, with a typed saved state):

* :mod:`.conv` (Conv2d), :mod:`.batchnorm` (BatchNorm + activation + max-pool, fused),
  :mod:`.linear`, :mod:`.activation` (standalone ReLU/LeakyReLU), :mod:`.pooling` (max-pool,
  global mean, flatten), :mod:`.loss` (the built-in cross-entropy and MSE);
* :mod:`.node` the node interface and the context a pass gives its nodes;
* :mod:`.program` compiles a model into nodes; :mod:`.runner` runs them (``FusedModel``: forward,
  backward, R-operator HVP);
* :mod:`.backends` ``layer_kernels(device, backend)``: the implementation (torch, cpp, triton)
  of the six swappable kernels (``conv2d_forward``, ``conv2d_backward``,
  ``bn_act_pool_{forward,backward,rforward,rbackward}``) that the one resolver
  (:mod:`fastmaml.kernels.resolver`) picks; :mod:`.cpp` probes the C++ ops and registers their fakes.

:mod:`.torch_kernels` gathers the torch implementations (for tests and benchmarks).
"""

from __future__ import annotations

from .backends import SWAPPABLE, TORCH, layer_kernels  # noqa: F401
