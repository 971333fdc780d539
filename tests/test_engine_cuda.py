"""The engine on a CUDA device against the per-task reference, in float64 (runs where CUDA is).

The CPU suite (test_engine.py) covers the engine's features; this file checks that the GPU path
(cuDNN grouped convolutions under vmap, cuDNN BatchNorm, the CUDA/Triton fused ops) computes the same
meta-gradient as the reference loop on the same device.
"""

from __future__ import annotations

import pytest
import torch

from helpers import classification_batch, conv_bn, mlp, regression_batch, rel_err, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def exact_float64():
    # TF32 does not touch float64, but keep the comparison free of any reduced-precision path.
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("batching", ["vmap", "loop"])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("kernels", ["torch", "cuda", "triton"])
@pytest.mark.parametrize("net", ["mlp", "conv_bn"])
def test_engine_matches_reference_on_cuda(net, kernels, K, batching):
    import fastmaml.kernels as fk

    if fk.available_backends().get(kernels) != "available":
        pytest.skip(f"{kernels} kernels: {fk.available_backends().get(kernels)}")
    torch.manual_seed(0)
    if net == "mlp":
        model, batch = mlp().double().cuda(), regression_batch(4)
    else:
        model, batch = conv_bn().double().cuda(), classification_batch(4)
    batch = tuple(t.cuda() for t in batch)
    kw = dict(inner_lr=0.1, inner_steps=K, adapt_bn=True)
    ref, _, _ = run(model, batch, "reference", **kw)
    eng, _, _ = run(model, batch, "engine", kernels=kernels, batching=batching, **kw)
    assert rel_err(eng, ref) <= 1e-10


@pytest.mark.parametrize("layer_kernels", ["torch", "triton"])
@pytest.mark.parametrize("K,first_order,adapt_bn", [(1, False, True), (3, False, False), (2, True, True)])
@pytest.mark.parametrize("net", ["conv_bn_pool", "conv_stride_mean", "leaky_plain_bn", "mlp_bn"])
def test_fused_path_matches_reference_on_cuda(net, K, first_order, adapt_bn, layer_kernels):
    """The fused path on the GPU (cuDNN grouped convolutions, Triton or torch BatchNorm blocks, the
    R-operator HVP) against the per-task reference on the same device, float64."""
    from fastmaml.layers import layer_kernels as pick
    from test_fused_engine import CLASSIFIERS, cls_batch, randomize

    try:
        pick(torch.device("cuda"), layer_kernels)
    except RuntimeError as e:
        pytest.skip(str(e))
    model = randomize(CLASSIFIERS[net]().double(), 3).cuda()
    batch = tuple(t.cuda() for t in cls_batch(T=4, seed=5))
    kw = dict(inner_lr=0.2, inner_steps=K, first_order=first_order, adapt_bn=adapt_bn, learn_lr=True,
              lr_mode="per_layer_per_step")
    ref, _, _ = run(model, batch, "reference", **kw)
    eng, _, learner = run(model, batch, "engine", kernels=layer_kernels, batching="fused", **kw)
    assert learner.execution_path.startswith(f"fused ({layer_kernels}")
    assert rel_err(eng, ref) <= 1e-10
