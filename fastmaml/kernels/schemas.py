"""The schemas of the ``torch.ops.fastmaml`` ops.

The C++ extension (``csrc/ops.cpp``) defines the same strings with ``TORCH_LIBRARY(fastmaml, m)``;
when it is not built, Python defines them from here. A test checks that the two agree.
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
