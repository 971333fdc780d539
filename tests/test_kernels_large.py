"""The fused ops at realistic sizes (issue 15), against an independent element-by-element definition.

The paper's conv4 on Omniglot adapts about 112,000 parameters; the kernels split [T, P] into fixed
column chunks (C++: 2,048-column chunks, 8,192-column blocks for per-element reductions; Triton:
1,024-column programs), so bugs in chunk strides, ragged tails or the merge of partial sums only
show past a few chunks. Before this file, no kernel test reduced more than 10,240 elements
(a wrong column-block stride in the C++ per-element ``segment_dot`` passed everything, and was off
by 10.4 at P = 20,000).

Here every op (inner_update, scale, segment_dot, reverse_step) of every backend that runs on this
machine (torch, cpp; cuda and triton on a GPU; triton under the CPU interpreter only at a small but
multi-program size) and every lr layout (0-d, per segment, per element) is compared with
``naive_*``: the rate written out segment by segment from a list of sizes (not from the segment-id
tensor the kernels read) and each reduction summed segment by segment in float64.

Tolerances: float64 1e-12 relative (observed ~1e-15); float32 elementwise 2e-6 relative plus 1e-6
absolute (inputs are below 6 in magnitude: about 2 ulp), float32 reductions 1e-5 relative to sum |a*b| (the C++ kernels accumulate in double, Triton in
float32).
"""

from __future__ import annotations

import pytest
import torch

import fastmaml
import fastmaml.kernels as K
from helpers import rel_err, run, set_random_rates

P_LARGE = 100_003  # > 12 per-element blocks of 8,192 and 48 chunks of 2,048, ragged tail
T_LARGE = 3
P_SMALL = 2_501    # three Triton programs of 1,024 columns, ragged tail
T_SMALL = 3


def _sizes(P: int):
    """Segment sizes summing to P: conv4-like tensors (weights, biases, BN pairs) plus a stretch of
    short segments (more ids per chunk than the C++ run scan and the Triton run loop handle
    directly: their 'fragmented' paths)."""
    base = [577, 64, 64, 64] + [3] * 40 + [4097, 31, 31] + [5] * 30 + [36_865, 64, 64, 64, 1]
    sizes = [s for s in base if s <= P]
    while sum(sizes) > P:
        sizes.pop()
    rest = P - sum(sizes)
    while rest > 0:
        s = min(rest, 20_011)
        sizes.append(s)
        rest -= s
    assert sum(sizes) == P and len(sizes) > 80
    return sizes


def _lr(form, P, sizes, dtype, g):
    if form == "scalar":
        return torch.rand((), generator=g, dtype=torch.float64).to(dtype) + 0.1, None
    if form == "element":
        return torch.rand(P, generator=g, dtype=torch.float64).to(dtype) + 0.1, None
    seg = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return torch.rand(len(sizes), generator=g, dtype=torch.float64).to(dtype) + 0.1, seg


# -- the independent definition ------------------------------------------------------------------

def naive_rate(lr, form, sizes, P):
    """a [P] in float64, segment by segment from the sizes."""
    if form == "scalar":
        return lr.double().expand(P).clone()
    if form == "element":
        return lr.double().clone()
    a = torch.empty(P, dtype=torch.float64)
    lo = 0
    for s, n in enumerate(sizes):
        a[lo:lo + n] = float(lr[s])
        lo += n
    return a


def naive_reduce(x, form, sizes):
    """sum over tasks, then over each segment (scalar: everything; element: nothing), float64."""
    x = x.double()
    if x.dim() == 2:
        x = x.sum(0)
    if form == "scalar":
        return x.sum()
    if form == "element":
        return x
    out = torch.empty(len(sizes), dtype=torch.float64)
    lo = 0
    for s, n in enumerate(sizes):
        out[s] = x[lo:lo + n].sum()
        lo += n
    return out


def _backends(large: bool):
    out = []
    for name, status in K.available_backends().items():
        if status != "available":
            continue
        if name in ("cuda",):
            out.append((name, "cuda"))
        elif name == "triton":
            if torch.cuda.is_available():
                out.append((name, "cuda"))
            elif not large:
                out.append((name, "cpu"))  # the interpreter: small grids only
        else:
            out.append((name, "cpu"))
    return out


def _check(got, want, dtype, reduction_scale=None):
    got = got.double().cpu()
    if dtype == torch.float64:
        err = (got - want).norm() / want.norm()
        assert err <= 1e-12, float(err)
    elif reduction_scale is None:
        bad = (got - want).abs() > 1e-6 + 2e-6 * want.abs()  # inputs |x| < 6: about 2 ulp
        assert not bool(bad.any()), float((got - want).abs().max())
    else:  # a sum of many products: relative to sum |a*b| of each entry
        assert bool(((got - want).abs() <= 1e-5 * reduction_scale + 1e-6).all()), float((got - want).abs().max())


def _run_all_ops(name, device, dtype, form, T, P, seed):
    K.set_backend(name)
    try:
        sizes = _sizes(P)
        g = torch.Generator().manual_seed(seed)
        lr, seg = _lr(form, P, sizes, dtype, g)
        rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
        theta2, theta1, grad2, grad1 = rnd(T, P), rnd(P), rnd(T, P), rnd(P)
        v, hv, gg, gq = rnd(T, P), rnd(T, P), rnd(T, P), rnd(T, P)
        dev = lambda t: None if t is None else t.to(device)
        a = naive_rate(lr, form, sizes, P)
        D = lambda t: t.double()
        for th, gr in ((theta2, grad2), (theta1, grad2), (theta2, grad1)):
            got = K.inner_update(dev(th), dev(gr), dev(lr), dev(seg))
            _check(got, D(th) - a * D(gr), dtype)
        _check(K.scale(dev(v), dev(lr), dev(seg)), a * D(v), dtype)
        _check(K.scale(dev(theta1), dev(lr), dev(seg)), a * D(theta1), dtype)
        scale = naive_reduce((D(v) * D(gg)).abs(), form, sizes)
        got = K.segment_dot(dev(v), dev(gg), dev(lr), dev(seg))
        assert got.shape == lr.shape
        _check(got, naive_reduce(D(v) * D(gg), form, sizes), dtype, scale)
        for use_hv, use_gq, w in ((True, True, 0.7), (False, True, 1.3), (True, False, 0.0), (False, False, 0.0)):
            out, d_lr = K.reverse_step(dev(v), dev(hv) if use_hv else None, dev(gg), dev(gq) if use_gq else None,
                                       w, dev(lr), dev(seg))
            want = D(v) - (D(hv) if use_hv else 0) + (w * D(gq) if use_gq else 0)
            _check(out, want, dtype)
            _check(d_lr, -naive_reduce(D(v) * D(gg), form, sizes), dtype, scale)
    finally:
        K.set_backend("auto")


@pytest.mark.parametrize("backend", _backends(large=True), ids=lambda b: b[0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("form", ["scalar", "segment", "element"])
def test_every_op_at_P_above_100k(backend, dtype, form):
    """All four ops at T = 3, P = 100,003 (many chunks and column blocks, ragged tails, long and
    short segments). Catches chunk/block stride and tail bugs (mutants cpp_segment_dot_col_stride,
    cpp_inner_update_tail) that small sizes cannot show."""
    name, device = backend
    if dtype == torch.float32 and name == "torch":
        pytest.skip("the torch backend is plain PyTorch elementwise math; float32 is checked on the compiled ones")
    _run_all_ops(name, device, dtype, form, T_LARGE, P_LARGE, seed={"scalar": 1, "segment": 2, "element": 3}[form])


@pytest.mark.parametrize("backend", _backends(large=False), ids=lambda b: b[0])
@pytest.mark.parametrize("form", ["scalar", "segment", "element"])
def test_every_op_at_several_programs(backend, form):
    """All four ops at T = 3, P = 2,501 in float64: three Triton programs with a ragged last one and
    blocks whose segments span more ids than the run loop handles (mutant triton_segment_run_loop)."""
    name, device = backend
    _run_all_ops(name, device, torch.float64, form, T_SMALL, P_SMALL, seed=4)


# -- the engine at a realistic size -----------------------------------------------------------------

def _wide_mlp():
    torch.manual_seed(41)
    return torch.nn.Sequential(torch.nn.Linear(1, 320), torch.nn.Tanh(), torch.nn.Linear(320, 320), torch.nn.Tanh(),
                               torch.nn.Linear(320, 1)).double()


@pytest.mark.parametrize("mode", ["per_layer_per_step", "per_parameter"])
def test_engine_at_P_above_100k_matches_oracle(mode):
    """The engine (default kernels: C++ on the CPU) on a 103,681-parameter MLP, K = 2, second order,
    learned non-uniform rates, against the oracle in float64 (whole-gradient relative error 1e-12;
    observed ~1e-15): the fused ops over many chunks inside the reverse pass."""
    from helpers import regression_batch

    model = _wide_mlp()
    batch = regression_batch(2, n_support=5, n_query=7, seed=41)
    kw = dict(inner_steps=2, learn_lr=True, lr_mode=mode, inner_lr=0.05)
    learners = {}
    grads = {}
    for backend in ("reference", "engine"):
        learner = fastmaml.MAML(__import__("copy").deepcopy(model), backend=backend, **kw)
        set_random_rates(learner, 42, lo=0.01, hi=0.05)
        learner.meta_step(*batch)
        learners[backend] = learner
        grads[backend] = [p.grad for p in learner.parameters()]
    assert learners["engine"].layout.numel > 100_000
    assert rel_err(grads["engine"], grads["reference"]) <= 1e-12
