"""Time of each fused op (``inner_update``, ``scale``, ``segment_dot``, ``reverse_step``) on every
kernel backend that runs on this device.

Workload (as in ``bench/bench_kernels.py``): the flat fast weights of the paper's Omniglot conv4
network (``fastmaml.models.conv4(5)``, all 18 parameter tensors, P = 112,261) for T = 32 tasks,
float32: theta [P] (shared meta-parameters), grad / v / hv / gq [T, P]; the learning rate is a
scalar or one value per segment (parameter tensor). The raw per-backend ops are timed
(``fastmaml.kernels.implementation``), i.e. the kernel without the public functions' argument checks.
"""

from __future__ import annotations

import pytest
import torch

import fastmaml.kernels as K
from fastmaml.layout import FlatLayout
from fastmaml.models import conv4
from fastmaml.kernels import flat_torch as ref

T = 32
BACKENDS = ("torch", "cpp", "cuda", "triton")
OPS = ("inner_update", "scale", "segment_dot", "reverse_step")
LR_FORMS = ("scalar", "segment")
# The tolerances of tests/test_kernels.py: reductions over T * P float32 products may sum in another order.
ELEMENTWISE = {"rtol": 1e-5, "atol": 1e-5}
REDUCTION = {"rtol": 1e-4, "atol": 1e-3}


@pytest.fixture(scope="module")
def workload(device):
    """Random float32 tensors in the conv4 layout, from one seed, on ``device``."""
    model = conv4(5)
    layout = FlatLayout.of(model, [n for n, _ in model.named_parameters()])
    P, S = layout.numel, layout.num_segments
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    data = {"theta": rnd(P), "grad": rnd(T, P), "v": rnd(T, P), "hv": rnd(T, P), "gq": rnd(T, P)}
    lrs = {"scalar": (torch.tensor(0.4, device=device), None),
           "segment": ((torch.rand(S, generator=g) + 0.1).to(device), layout.segments(torch.device(device)))}
    return data, lrs, P


def skip_reason(backend: str, device: str):
    """Why ``backend`` is not timed on ``device``, or None."""
    if backend == "cpp" and device != "cpu":
        return "the cpp kernels run on CPU tensors"
    if backend == "cuda" and device != "cuda":
        return "the cuda kernels need a CUDA device"
    if backend == "triton" and device != "cuda":
        return "the triton kernels need a CUDA device (its CPU interpreter checks results, it is not worth timing)"
    status = K.available_backends()[backend]
    return None if status == "available" else status


def call(ops, op: str, d, lr, seg):
    """One call of ``op`` from the module ``ops``, with the arguments bench_kernels.py uses."""
    if op == "inner_update":
        return ops.inner_update(d["theta"], d["grad"], lr, seg)
    if op == "scale":
        return ops.scale(d["v"], lr, seg)
    if op == "segment_dot":
        return ops.segment_dot(d["v"], d["grad"], lr, seg)
    return ops.reverse_step(d["v"], d["hv"], d["grad"], d["gq"], 0.5, lr, seg)


@pytest.mark.parametrize("form", LR_FORMS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_op(benchmark, device, workload, backend, op, form):
    """One fused op on one backend, scalar or per-segment learning rate."""
    why = skip_reason(backend, device)
    if why:
        pytest.skip(why)
    data, lrs, P = workload
    lr, seg = lrs[form]
    ops = K.implementation(backend)

    # Checked outside the timed function: no time is reported for a wrong result.
    out, expected = call(ops, op, data, lr, seg), call(ref, op, data, lr, seg)
    if op == "reverse_step":
        torch.testing.assert_close(out[0], expected[0], **ELEMENTWISE)
        torch.testing.assert_close(out[1], expected[1], **REDUCTION)
    else:
        torch.testing.assert_close(out, expected, **(REDUCTION if op == "segment_dot" else ELEMENTWISE))

    def run():
        result = call(ops, op, data, lr, seg)
        if device == "cuda":  # time the kernels, not just their launch
            torch.cuda.synchronize()
        return result

    # One group per (op, lr form): the backends of a group are timed on identical calls.
    benchmark.group = f"op:{op} lr={form}"
    benchmark.extra_info.update(backend=backend, op=op, lr=form, T=T, P=P, dtype="float32",
                                device=device, threads=torch.get_num_threads())
    benchmark(run)
