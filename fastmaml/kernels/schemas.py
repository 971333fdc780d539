"""The schemas of the ops Python defines when the extension does not: one table per op namespace.

* ``torch.ops.fastmaml`` flat-layout ops (``SCHEMAS``): the C++ extension (``csrc/cpu/flat_ops.cpp``) defines
  the same strings with ``TORCH_LIBRARY(fastmaml, m)``; when it is not built, Python defines them
  from here (:mod:`.registry`). A test checks that the two agree.
* ``torch.ops.fastmaml_cg`` CG ops (``CG_SCHEMAS``): likewise (``csrc/cpu/cg.cpp``; :mod:`.cg`).
* The layer ops of ``torch.ops.fastmaml`` (``LAYER_SCHEMAS``: ``conv2d_tasks``, ``bn_act_pool_*``)
  exist only in the extension (``csrc/cpu/conv.cpp``, ``csrc/cpu/batchnorm.cpp``; without it the layer
  kernels run their torch implementations directly); their fake kernels are declared by their
  families (``CPP_OPS`` in fastmaml/layers/conv.py, batchnorm.py), under the same names.

``TABLE``: namespace -> op name -> schema, every op the project registers;
``PYTHON_DEFINES``: those that Python defines itself when the extension is not built.
tests/test_cpp_kernels.py checks that the compiled extension registers exactly ``TABLE``.
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

LAYER_SCHEMAS = {
    "conv2d_tasks": "conv2d_tasks(Tensor x, Tensor w, Tensor? b, int stride, int padding) -> Tensor",
    "conv2d_tasks_backward": (
        "conv2d_tasks_backward(Tensor dy, Tensor x, Tensor w, int stride, int padding, bool need_dx, "
        "bool need_dw, bool need_bias) -> (Tensor, Tensor, Tensor)"
    ),
    "bn_act_pool_forward": (
        "bn_act_pool_forward(Tensor z, Tensor gamma, Tensor beta, float eps, float slope, int pool)"
        " -> (Tensor, Tensor, Tensor, Tensor)"
    ),
    "bn_act_pool_backward": (
        "bn_act_pool_backward(Tensor dout, Tensor z, Tensor mean, Tensor rstd, Tensor gamma, Tensor beta, "
        "Tensor? idx, float slope, int pool) -> (Tensor, Tensor, Tensor)"
    ),
    "bn_act_pool_rforward": (
        "bn_act_pool_rforward(Tensor? rz, Tensor z, Tensor mean, Tensor rstd, Tensor gamma, Tensor beta, "
        "Tensor? ugamma, Tensor? ubeta, Tensor? idx, float slope, int pool) -> (Tensor, Tensor, Tensor)"
    ),
    "bn_act_pool_rbackward": (
        "bn_act_pool_rbackward(Tensor dout, Tensor? rdout, Tensor z, Tensor? rz, Tensor mean, Tensor rstd, "
        "Tensor rmean, Tensor q, Tensor gamma, Tensor beta, Tensor? ugamma, Tensor? idx, float slope, int pool)"
        " -> (Tensor, Tensor, Tensor)"
    ),
    # which vector ISA the BatchNorm kernels were compiled for (a diagnostic, no fake kernel)
    "bn_kernels_isa": "bn_kernels_isa() -> str",
}

PYTHON_DEFINES = {"fastmaml": SCHEMAS, "fastmaml_cg": CG_SCHEMAS}
TABLE = {"fastmaml": {**SCHEMAS, **LAYER_SCHEMAS}, "fastmaml_cg": CG_SCHEMAS}
