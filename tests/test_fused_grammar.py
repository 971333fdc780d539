"""The fused path against the per-task oracle on random models over its whole grammar (issue 21).

Each case (tests/fused_grammar.py) is a small random model made of the layers
``fastmaml/layers/program.py`` compiles, in every position PyTorch accepts them, with a random
float64 task batch and one meta-step configuration: K = 1..3, first or second order, ``adapt_bn``,
the four ``lr_mode`` values with learned or fixed (random, non-uniform) rates, multi-step loss
weights, store / store with no budget (checkpoints) / recompute memory, task chunks (the last one
partial or not), adapted subsets (all, the head, any subset), a frozen parameter, N = 1 or more
examples per task, cross-entropy or MSE. The cases are a pairwise covering sample: every pair of
options seen in a pool of random draws occurs together in at least one case
(:func:`test_sample_covers_every_pair_of_options`).

For each case the meta-gradient of every trainable parameter and learned rate is compared with
``backend="reference"`` (a per-task loop of autograd through the unrolled inner loop, which shares no
code with the fused path) on every CPU layer backend (``cpp`` where the extension is built, and
``torch``), as one whole-gradient relative error <= ``TOL`` = 1e-12 (or, where the oracle itself
moves more than that under float64 rounding noise, 10x that move: :func:`rounding_bound`; 4 of the
wide sweep's 3000 cases, none of the default's), together with the meta-objective, the
per-task query losses and accuracies, and the adapted parameters of ``adapt()``. Every learner must
report ``execution_path == "fused (<backend> layer kernels)"``: a silent fallback to the generic path
fails. A smaller sample runs the Triton layer kernels (under TRITON_INTERPRET=1 without a GPU).

Default: 300 cases (the cover takes about 110 of them, the rest are further draws) and 6 Triton
cases: under a minute of CPU time on one core (``time``: user 24-40 s with the machine's load, about
a third of it the 6 Triton cases in the interpreter).
``FASTMAML_WIDE_GRAMMAR=1`` runs the wide sweep: 3000 cases covering the pairs of a pool of 20000
draws, and up to 40 Triton cases (18 cover their pairs); about 3 + 1 minutes of CPU time.
``FASTMAML_GRAMMAR_CASES=n`` sets the number of cases.

Trust: each of these planted bugs made this file fail (and was removed; failing cases of the
default 300 when written): the HVP of a standalone LeakyReLU computed as a ReLU's (83;
tests/test_fused_engine.py and test_layers.py passed with it), a first convolution's bias dropped
from the HVP (39), a non-pooled BatchNorm's R{dbeta} with the activation's slope applied twice
(22), a stride-2 convolution's input gradient without output_padding (38), a Linear's rows on a
non-flat input taken in the wrong order (69), and in the Triton kernels a non-pooled block's
R-backward dropping R{z} (3 of 6 Triton cases).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.util
import inspect
import os
import typing
from typing import Dict, List, Tuple

import pytest
import torch
from torch import Tensor, nn

import fastmaml
from fastmaml.layers import layer_kernels, program

import fused_grammar as G

WIDE = os.environ.get("FASTMAML_WIDE_GRAMMAR") == "1"
N_CASES = int(os.environ.get("FASTMAML_GRAMMAR_CASES", 3000 if WIDE else 300))
POOL = 20000 if WIDE else 2000
N_TRITON = 40 if WIDE else 6
TOL = 1e-12
DT = torch.float64

SAMPLE, POOL_CASES, N_COVER = G.select(N_CASES, POOL)


def _available(backend: str) -> bool:
    try:
        layer_kernels(torch.device("cpu"), backend)
        return True
    except RuntimeError:
        return False


CPU_BACKENDS = [b for b in ("cpp", "torch") if _available(b)]


# -- running one case ------------------------------------------------------------------------------

def _learner(case: G.Case, model: nn.Module, rate_scale: float, **kw) -> fastmaml.MAML:
    """A fresh learner on a copy of ``model``, its rates randomized from the case's seed."""
    m = copy.deepcopy(model)
    learner = fastmaml.MAML(m, **G.learner_kwargs(case, m), **kw)
    G.random_rates(learner.inner_lr.lr, case.seed, rate_scale)
    return learner


def _meta_step(case: G.Case, model: nn.Module, data, rate_scale: float, **kw):
    """One meta-step: (name -> .grad of every trainable parameter and learned rate, the step's
    output, the learner)."""
    learner = _learner(case, model, rate_scale, **kw)
    out = learner.meta_step(*data)
    grads = {n: p.grad for n, p in learner.named_parameters() if p.requires_grad}
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"no meta-gradient for {missing}"
    return grads, out, learner


def _adapt(case: G.Case, model: nn.Module, data, rate_scale: float, **kw) -> Tuple[Tensor, Tensor]:
    """adapt() on the support set: (fast weights [T, P], support losses [K, T])."""
    fast = _learner(case, model, rate_scale, **kw).adapt(data[0], data[1])
    return fast.flat, fast.support_losses


def _rel(got: Dict[str, Tensor], ref: Dict[str, Tensor]) -> float:
    """Whole-gradient relative error ||got - ref|| / ||ref|| over every tensor together."""
    assert got.keys() == ref.keys(), (sorted(got), sorted(ref))
    a = torch.cat([got[n].flatten() for n in ref])
    b = torch.cat([ref[n].flatten() for n in ref])
    return float((a - b).norm() / b.norm())


def _close(a: Tensor, b: Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-12, atol=1e-14))


VARIANTS = 4


def oracle(case: G.Case):
    """The case's model, batch, rate scale and the oracle's results, on the first of ``VARIANTS``
    deterministic variants (weights redrawn, rates divided by 4 each time) where the oracle's inner
    loop does not blow up (every support loss finite and at most 4 L_0 + 1) and its meta-gradient is
    not exactly zero. A random model may have a ReLU whose few units all die on the few examples (no
    gradient to compare), or a wide unnormalized layer whose curvature makes SGD at these rates
    diverge; such a variant checks nothing and is skipped, never the case."""
    data = G.batch(case, DT)
    for variant in range(VARIANTS):
        model = G.build_model(case, DT, variant=variant)
        scale = 0.25 ** variant
        flat, losses = _adapt(case, model, data, scale, backend="reference")
        if not (torch.isfinite(losses).all() and (losses <= 4 * losses[:1] + 1).all()):
            continue
        ref, out, _ = _meta_step(case, model, data, scale, backend="reference")
        if torch.cat([g.flatten() for g in ref.values()]).norm() > 0:
            return model, data, scale, ref, out, flat, losses
    pytest.fail(f"no variant of the case is usable (the generator should not make it): {case.describe()}")


def rounding_bound(case: G.Case, model: nn.Module, data, scale: float, ref: Dict[str, Tensor]) -> float:
    """How far rounding alone moves this case's meta-gradient: 10x the largest relative change of
    the oracle's own meta-gradient when every input is multiplied by 1 + 1e-16 N(0, 1) (float64
    rounding noise; 3 draws), capped at 1e-9. A few cases (BatchNorm over a few values that nearly
    agree) amplify rounding 1e4-fold: there 1e-12 would fail a correct fused path."""
    g = torch.Generator().manual_seed(40_000 + case.seed)
    moved = 0.0
    for _ in range(3):
        noisy = tuple(t * (1 + 1e-16 * torch.randn(t.shape, generator=g, dtype=t.dtype)) if t.is_floating_point()
                      else t for t in data)
        moved = max(moved, _rel(_meta_step(case, model, noisy, scale, backend="reference")[0], ref))
    return min(10 * moved, 1e-9)


def check_case(case: G.Case, backends: List[str]) -> None:
    model, data, scale, ref, out_r, flat_r, losses_r = oracle(case)
    bound = None
    for backend in backends:
        where = f"[{backend}] rate scale {scale:g} {case.describe()}"
        got, out_f, learner = _meta_step(case, model, data, scale, batching="fused", kernels=backend)
        assert learner.execution_path == f"fused ({backend} layer kernels)", f"{learner.execution_path}\n{where}"
        err = _rel(got, ref)
        if err > TOL:  # ill-conditioned, or wrong: measure what rounding alone does to this case
            bound = rounding_bound(case, model, data, scale, ref) if bound is None else bound
            assert err <= bound, (f"meta-gradient relative error {err:.3e} > {TOL:g} and > {bound:.1e}, 10x what "
                                  f"1e-16 input noise does to the oracle\n{where}")
        assert _close(out_f.loss, out_r.loss), f"objective {out_f.loss} vs {out_r.loss}\n{where}"
        assert _close(out_f.task_losses, out_r.task_losses), f"query losses differ\n{where}"
        if case.loss == "ce":
            assert torch.equal(out_f.task_accuracy, out_r.task_accuracy), f"query accuracy differs\n{where}"
        flat_f, losses_f = _adapt(case, model, data, scale, batching="fused", kernels=backend)
        err = float((flat_f - flat_r).norm() / flat_r.norm())
        assert err <= TOL, f"adapted parameters: relative error {err:.3e}\n{where}"
        assert _close(losses_f, losses_r), f"adapt's support losses differ\n{where}"


@pytest.mark.parametrize("case", SAMPLE, ids=[f"seed{c.seed}" for c in SAMPLE])
def test_fused_path_matches_oracle(case: G.Case) -> None:
    assert CPU_BACKENDS, "no CPU layer backend available"
    check_case(case, CPU_BACKENDS)


# -- Triton: a smaller sample ----------------------------------------------------------------------

def _triton_features(case: G.Case) -> frozenset:
    """What the Triton layer kernels change: the BatchNorm blocks, one-input-channel convolutions."""
    keep = ("bn.", "node=bn", "conv.cin1", "conv.stride", "adapt_bn", "K=", "T=")
    return frozenset(f for f in case.features if f.startswith(keep))


def _bn_blocks(case: G.Case) -> int:
    def count(layers) -> int:
        return sum(count(s[1]) if s[0] == "seq" else s[6] if s[0] == "conv4" else int(s[0] == "bn") for s in layers)
    return count(case.layers)


def triton_sample(n: int) -> List[G.Case]:
    """Greedy pairwise cover of the Triton-relevant features over the sample's second-order cases
    that are cheap under the interpreter (which runs every kernel program in Python: T <= 2, K = 1,
    at most 2 BatchNorm blocks; the wide sweep: T <= 3, K <= 2, any), at most ``n`` cases, each pick
    the most new pairs per BatchNorm block."""
    small = (lambda c: c.T <= 3 and c.K <= 2) if WIDE else (lambda c: c.T <= 2 and c.K == 1 and _bn_blocks(c) <= 2)
    eligible = [c for c in SAMPLE if not c.first_order and small(c)
                and ("node=bn" in c.features or "conv.cin1_k3p1=True" in c.features)]
    uncovered = G.pairs_of([_triton_features(c) for c in eligible])
    chosen: List[G.Case] = []
    while uncovered and len(chosen) < n:
        best = max(eligible, key=lambda c: len(G.pairs_of([_triton_features(c)]) & uncovered) / (1 + _bn_blocks(c)))
        chosen.append(best)
        uncovered -= G.pairs_of([_triton_features(best)])
    return chosen


TRITON_CASES = triton_sample(N_TRITON)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("case", TRITON_CASES, ids=[f"seed{c.seed}" for c in TRITON_CASES])
def test_fused_path_matches_oracle_triton(case: G.Case) -> None:
    # not skipped when Triton is installed but its kernels fail the one-time probe against the
    # reference (fastmaml.layers.backends._triton_on): layer_kernels raises, and says why
    layer_kernels(torch.device("cpu"), "triton")
    check_case(case, ["triton"])


# -- the sample covers the grammar -----------------------------------------------------------------

LEARNER_FACTORS = ("T", "n_support", "n_query", "K", "first_order", "adapt_bn", "lr_mode", "learn_lr", "memory",
                   "task_chunk", "multi_step", "adapt", "frozen", "loss")


def _infeasible(a: str, b: str) -> bool:
    """Pairs of a meta-step option and a model option that no case can have (by construction)."""
    pair = {a, b}
    vector_bn = {"tail=bn", "bn.after=gap", "gap.then=bn"}  # BatchNorm over N values only
    no_conv = {"root=mlp", "root=seq", "flatten.after=input", "linear.after=input", "flatten.of=2d", "act.on=2d",
               "linear.on=2d", "out=seq"}
    return (pair in ({"loss=ce", "out=image"}, {"loss=ce", "out=seq"})  # a non-flat output is regressed
            or pair == {"K=1", "bn.steps=S<K"}                  # S >= 1 weight sets
            or (bool(pair & {"n_support=1", "n_support=2", "n_query=1"}) and bool(pair & vector_bn))  # N < 3
            or ("frozen=conv" in pair and bool(pair & no_conv)))  # no convolution to freeze


def test_sample_covers_every_pair_of_options():
    """Every pair of features that occurs in the pool occurs in the sample; and every meta-step
    option occurs with every model option (layer, option, position) unless no case can have both."""
    universe = G.pairs_of([c.features for c in POOL_CASES])
    covered = G.pairs_of([c.features for c in SAMPLE])
    missing = universe - covered
    assert not missing, f"{len(missing)} pairs not covered, e.g. {sorted(missing)[:10]}"
    names = set().union(*(c.features for c in POOL_CASES))
    learner = {f for f in names if f.split("=")[0] in LEARNER_FACTORS}
    model = names - learner
    absent = [(a, b) for a in sorted(learner) for b in sorted(model)
              if tuple(sorted((a, b))) not in covered and not _infeasible(a, b)]
    assert not absent, f"meta-step x model options never together: {absent[:20]}"
    assert len(SAMPLE) >= N_COVER and N_COVER < len(POOL_CASES)


def _category(node, name: str, value):
    """A node field's value, as the category the generator must cover."""
    if name in ("weight", "bias"):
        return "param" if isinstance(value, str) else None
    if name == "slope":
        return "relu" if value == 0.0 else ("none" if value == 1.0 and isinstance(node, program.BatchNormBlock)
                                            else "leaky")
    if name == "steps":
        return "per-step" if value else 0
    if name == "pre_pad":
        return None if value is None else "symmetric" if len(set(value)) == 1 else "asymmetric"
    return value


# Every field of every node type program.py compiles, and the values the sample must show.
NODE_FIELDS = {
    program.Conv: {"weight": {"param"}, "bias": {"param", None}, "stride": {1, 2}, "padding": {0, 1},
                   "pre_pad": {None, "symmetric", "asymmetric"}},
    program.BatchNormBlock: {"weight": {"param", None}, "bias": {"param", None}, "eps": {1e-5, 1e-3},
                             "slope": {"relu", "leaky", "none"}, "pool": {0, 2}, "steps": {0, "per-step"}},
    program.Act: {"slope": {"relu", "leaky"}},
    program.MaxPool: {},
    program.GlobalMean: {"keepdim": {True, False}},
    program.Flatten: {},
    program.Linear: {"weight": {"param"}, "bias": {"param", None}},
}


def _module_classes_in_program() -> set:
    """The module classes program.py refers to (``nn.X`` and what it imports from fastmaml.models):
    the layers it can compile."""
    tree = ast.parse(inspect.getsource(program))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "nn":
            names.add(getattr(nn, node.attr))
        if isinstance(node, ast.ImportFrom) and node.module == "models":
            names.update(getattr(fastmaml.models, a.name) for a in node.names)
    return {c for c in names if isinstance(c, type) and issubclass(c, nn.Module) and c is not nn.Module}


def test_sample_covers_every_node_and_option_of_program_py():
    """Every node type and every value of every node field that program.py compiles occurs in the
    sample, and every module class it refers to. A node type or field added to program.py without
    a place in NODE_FIELDS (and in the generator) fails here."""
    assert set(typing.get_args(program.Node)) == set(NODE_FIELDS), "a node type without coverage in the generator"
    for cls, want in NODE_FIELDS.items():
        assert {f.name for f in dataclasses.fields(cls)} == set(want), f"{cls.__name__}: a field without coverage"
    seen: Dict[type, Dict[str, set]] = {cls: {f: set() for f in want} for cls, want in NODE_FIELDS.items()}
    modules = set()
    kinds = set()
    for case in SAMPLE:
        model = G.build_model(case, randomize=False)
        modules.update(type(m) for m in model.modules())
        for m in model.modules():
            if isinstance(m, fastmaml.models.PerStepBatchNorm):
                kinds.add(f"per-step dims={m.dims}")
        nodes = program.compile_model(model)
        for node in nodes:
            for f in NODE_FIELDS[type(node)]:
                seen[type(node)][f].add(_category(node, f, getattr(node, f)))
    for cls, want in NODE_FIELDS.items():
        for f, values in want.items():
            assert seen[cls][f] == values, f"{cls.__name__}.{f}: saw {seen[cls][f]}, want {values}"
    need = _module_classes_in_program()
    assert need - modules == set(), f"module classes program.py compiles but the sample lacks: {need - modules}"
    assert kinds == {"per-step dims=1", "per-step dims=2"}
