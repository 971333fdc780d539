"""The schemas of the ops Python defines when the extension does not: one table per op namespace.

* ``torch.ops.fastmaml`` flat-layout ops (``SCHEMAS``): the C++ extension (``csrc/cpu/flat_ops.cpp``) defines
  the same strings with ``TORCH_LIBRARY(fastmaml, m)``; when it is not built, Python defines them
  from here (:mod:`.registry`). A test checks that the two agree.
* ``torch.ops.fastmaml_cg`` CG ops (``CG_SCHEMAS``): likewise (``csrc/cpu/cg.cpp``; :mod:`.cg`).
* The layer ops of ``torch.ops.fastmaml`` (``conv2d_tasks``, ``bn_act_pool_*``) exist only in the
  extension (without it the layer kernels run their torch implementations directly); their fake
  kernels are declared by their families (``CPP_OPS`` in fastmaml/layers/conv.py, batchnorm.py).

``TABLE``: namespace -> op name -> schema, every schema Python may define.
"""

SCHEMAS = {
    "inner_update": "inner_update(Tensor theta, Tensor grad, Tensor lr, Tensor? segments) -> Tensor",
    "scale": "scale(Tensor v, Tensor lr, Tensor? segments) -> Tensor",
    "segment_dot": "segment_dot(Tensor a, Tensor b, Tensor lr, Tensor? segments) -> Tensor",
    "reverse_step": (
        "reverse_step(Tensor v, Tensor? hv, Tensor g, Tensor? gq, float w, Tensor lr, Tensor? segments)"
        " -> (Tensor, Tensor)"
    ),
}

CG_SCHEMAS = {
    "cg_step": "cg_step(Tensor x, Tensor r, Tensor p, Tensor Ap, Tensor alpha) -> (Tensor, Tensor, Tensor)",
    "cg_direction": "cg_direction(Tensor r, Tensor p, Tensor beta) -> Tensor",
}

TABLE = {"fastmaml": SCHEMAS, "fastmaml_cg": CG_SCHEMAS}
