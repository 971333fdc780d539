"""Random small models over the fused path's whole grammar, with task batches and meta-step options,
chosen so that every pair of options occurs (used by tests/test_fused_grammar.py).

The grammar is what ``fastmaml/layers/program.py`` compiles: ``nn.Sequential`` (nested too) of
Conv2d (square kernel 1..3, stride 1 or 2, zero padding 0 or 1, with or without bias; sometimes
after a ZeroPad2d of 0..2 on each side, symmetric or not), BatchNorm2d /
BatchNorm1d / PerStepBatchNorm (affine or not, any eps, running statistics tracked or not) fused
with a following ReLU / LeakyReLU and (2-d) MaxPool2d(2), standalone ReLU / LeakyReLU, standalone
MaxPool2d(2), AdaptiveAvgPool2d(1), Flatten, Linear (with or without bias, on the last dimension
of a flat vector, of [C, L] or of an image) and Identity; and
:class:`fastmaml.models.Conv4` (max-pool or stride-2 blocks with the mean over space, the latter
padded symmetrically or as TensorFlow's SAME, per-step BatchNorm or not). Every layer is placed wherever PyTorch accepts its input: first on the raw input,
after a convolution, a BatchNorm block, an activation, a pool, the global mean or a Linear.

A :class:`Case` is one model, one task batch and one learner configuration. :func:`draw` walks the
grammar with a seeded RNG, tracking the per-example shape so that every layer accepts its input,
and records the case's *features*: one string per option that occurs, e.g. ``conv.stride=2``,
``act.after=linear``, ``lr_mode=per_parameter``. :func:`select` draws a pool of cases and picks,
greedily, the case that adds the most not-yet-covered feature pairs, until every pair seen in the
pool is covered: a pairwise covering array over a constrained grammar (the pool's pairs are the
feasible ones), then tops up with further draws. The constraints:

* a BatchNorm normalizes over N * H * W >= 3 values per channel, N being the smaller of the support
  and query sizes (PyTorch refuses one value; over two the output is +-1 whatever the input, so the
  layers before it get a zero gradient, up to rounding, that no comparison could check);
* some output of every convolution reads a real input position, not only padding;
* a ReLU / LeakyReLU right after a BatchNorm, and a MaxPool2d(2) right after a 2-d BatchNorm (and
  its activation), belong to the BatchNorm block; "standalone" ones follow something else.

Nothing here imports the fused path: the models are plain ``torch.nn`` modules.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from fastmaml.models import Conv4, PerStepBatchNorm

SLOPES = (0.01, 0.2, 0.5, -0.3, 1.6)  # LeakyReLU negative slopes: small, usual, large, negative, > 1
LR_MODES = ("scalar", "per_step", "per_layer_per_step", "per_parameter")

Spec = Tuple  # ("conv", cin, cout, k, stride, pad, bias) / ("bn", kind, C, affine, eps, steps, track)
#               ("zpad", left, right, top, bottom) (always right before a "conv")
#               ("act", slope) / ("pool",) / ("gap",) / ("flatten",) / ("linear", fin, fout, bias)
#               ("id",) / ("seq", (Spec, ...))
#               ("conv4", ways, hidden, cin, max_pool, side, blocks, S, padding)


@dataclass(frozen=True)
class Case:
    """One model + task batch + learner configuration (all deterministic from ``seed``)."""

    seed: int
    layers: Tuple[Spec, ...]       # the model, top level (a Conv4 is one ("conv4", ...) entry)
    in_shape: Tuple[int, ...]      # one example
    out_shape: Tuple[int, ...]     # one example's prediction
    loss: str                      # "ce" (int64 labels) or "mse" (targets shaped like the predictions)
    T: int
    n_support: int
    n_query: int
    K: int
    first_order: bool
    adapt_bn: bool
    lr_mode: str
    learn_lr: bool
    memory: str                    # "store", "store0" (store_budget=0: checkpoints), "recompute"
    task_chunk: Optional[int]
    weights: Optional[Tuple[float, ...]]   # multi_step_weights
    adapt: str                     # "all", "head" (the last layer's parameters) or "subset"
    adapt_pick: Tuple[int, ...]    # parameter indices (model order) adapted when adapt == "subset"
    head: Tuple[int, ...]          # parameter indices of the last layer that has parameters
    frozen: Tuple[int, ...]        # parameter indices set requires_grad=False
    features: FrozenSet[str] = field(compare=False)

    def describe(self) -> str:
        return (f"seed={self.seed} layers={self.layers} in={self.in_shape} loss={self.loss} T={self.T} "
                f"N={self.n_support}/{self.n_query} K={self.K} first_order={self.first_order} "
                f"adapt_bn={self.adapt_bn} lr_mode={self.lr_mode} learn_lr={self.learn_lr} memory={self.memory} "
                f"task_chunk={self.task_chunk} weights={self.weights} adapt={self.adapt}{self.adapt_pick} "
                f"frozen={self.frozen}")


def _sees_input(n: int, k: int, s: int, p: int, before: int = 0, after: int = 0) -> bool:
    """Does some output of a convolution (size n, kernel k, stride s, padding p, after a ZeroPad2d of
    ``before`` / ``after``) read a real input position? (A 1x1 kernel with padding 1 and stride 2 on a
    1-wide map reads only padding: its output is the bias alone and everything before it gets no
    gradient.)"""
    length = before + n + after
    return any(i * s - p + k - 1 >= before and i * s - p <= before + n - 1
               for i in range((length + 2 * p - k) // s + 1))


class _Walk:
    """The grammar walk: appends layer specs, tracks the per-example shape, the parameters (their
    indices in model order: which are BatchNorm's, which the last layer's) and the features."""

    def __init__(self, rng: random.Random, n_min: int, K: int, pad_rng: Optional[random.Random] = None) -> None:
        self.rng = rng
        # the ZeroPad2d choices draw from a stream of their own, so that adding them left every other
        # choice of every case as it was (the sample kept its cover)
        self.pad_rng = pad_rng if pad_rng is not None else random.Random(0)
        self.n_min = n_min
        self.K = K
        self.layers: List[Spec] = []
        self.feats: set = set()
        self.shape: Tuple[int, ...] = ()
        self.prev = "input"          # what the next layer follows (for the position features)
        self.after_bn: Optional[Tuple[bool, bool]] = None  # (has act, 2-d without pool) of a BN just added
        self.nparams = 0
        self.bn_params: List[int] = []
        self.kind_of_param: List[str] = []
        self.head: Tuple[int, ...] = ()

    # -- bookkeeping -------------------------------------------------------------------------------
    def _params(self, kinds: Sequence[str]) -> None:
        idx = tuple(range(self.nparams, self.nparams + len(kinds)))
        self.kind_of_param += list(kinds)
        self.nparams += len(kinds)
        if idx:
            self.head = idx
        if kinds and kinds[0] == "bn":
            self.bn_params += list(idx)

    def _add(self, spec: Spec, kind: str) -> None:
        self.layers.append(spec)
        self.prev = kind
        self.after_bn = None

    def f(self, *names: str) -> None:
        self.feats.update(names)

    def maybe_identity(self, p: float = 0.12) -> None:
        if self.rng.random() < p:
            self.layers.append(("id",))
            self.f("module=identity")

    # -- layers ------------------------------------------------------------------------------------
    def conv(self, cout: int) -> bool:
        C, H, W = self.shape
        r = self.rng
        pre = (0, 0, 0, 0)  # a ZeroPad2d before it: (left, right, top, bottom)
        if self.pad_rng.random() < 0.25:
            pre = tuple(self.pad_rng.choice((0, 0, 1, 2)) for _ in range(4))
            pre = pre if any(pre) else (0, 1, 0, 1)
        left, right, top, bottom = pre
        Hp, Wp = H + top + bottom, W + left + right
        options = [(k, s, p) for k in (1, 2, 3) for s in (1, 2) for p in (0, 1)
                   if Hp + 2 * p >= k and Wp + 2 * p >= k and _sees_input(H, k, s, p, top, bottom)
                   and _sees_input(W, k, s, p, left, right)]
        k, s, p = r.choice(options)
        bias = r.random() < 0.6
        Ho, Wo = (Hp + 2 * p - k) // s + 1, (Wp + 2 * p - k) // s + 1
        self.f("node=conv", f"conv.k={k}", f"conv.stride={s}", f"conv.pad={p}", f"conv.bias={bias}",
               f"conv.cin1={C == 1}", f"conv.after={self.prev}", f"conv.odd_in={H % 2 == 1 or W % 2 == 1}",
               f"conv.pre_pad={any(pre)}")
        if C == 1 and k == 3 and p == 1 and not any(pre):
            self.f("conv.cin1_k3p1=True")  # the Triton backend's direct kernel
        if any(pre):
            self.layers.append(("zpad", *pre))
        self._add(("conv", C, cout, k, s, p, bias), "conv")
        self._params(["conv"] * (2 if bias else 1))
        self.shape = (cout, Ho, Wo)
        return True

    def bn(self, pool_ok: bool = True) -> bool:
        """A BatchNorm block (1-d or 2-d by the shape), with its fused activation and pool."""
        r = self.rng
        two_d = len(self.shape) == 3
        C = self.shape[0]
        M = self.n_min * (self.shape[1] * self.shape[2] if two_d else (self.shape[1] if len(self.shape) == 2 else 1))
        if M < 3:
            return False  # over 2 values the normalized output is +-1 whatever the input: no gradient flows back
        per_step = r.random() < 0.35
        kind = ("ps" if per_step else "bn") + ("2d" if two_d else "1d")
        affine = r.random() < 0.7
        eps = r.choice((1e-5, 1e-3))
        S = r.choice((1, 2, 3, 4)) if per_step else 0
        track = r.random() < 0.5 and not per_step
        where = self.prev
        self._add(("bn", kind, C, affine, eps, S, track), "bn")
        self._params(["bn"] * (2 if affine else 0))
        self.f("node=bn", f"bn.kind={kind}", f"bn.affine={affine}", f"bn.eps={eps:g}", f"bn.after={where}",
               f"bn.track={track}")
        if per_step:
            self.f("bn.steps=" + ("S<K" if S < self.K else "S=K" if S == self.K else "S>K"))
        act = r.choice(("none", "relu", "leaky"))
        self.f(f"bn.act={act}")
        if act != "none":
            self.maybe_identity()  # an Identity between BatchNorm and its activation is dropped first
            self.layers.append(("act", 0.0 if act == "relu" else r.choice(SLOPES)))
        pool = two_d and pool_ok and self.shape[1] >= 2 and self.shape[2] >= 2 and r.random() < 0.5
        if two_d:
            self.f(f"bn.pool={pool}")
        if pool:
            self.maybe_identity()
            self.layers.append(("pool",))
            self.f(f"bn.pool_odd={self.shape[1] % 2 == 1 or self.shape[2] % 2 == 1}")
            self.shape = (C, self.shape[1] // 2, self.shape[2] // 2)
        self.after_bn = (act != "none", two_d and not pool)
        return True

    def act(self, leaky: bool = False) -> bool:
        """A standalone ReLU / LeakyReLU; ``leaky``: a LeakyReLU only (at the output, where a ReLU
        whose units all die for the few examples would leave no gradient to compare)."""
        if self.after_bn is not None and not self.after_bn[0]:
            return False  # it would be the BatchNorm's own activation
        slope = 0.0 if self.rng.random() < 0.4 and not leaky else self.rng.choice(SLOPES)
        self.f("node=act", f"act.slope={'relu' if slope == 0.0 else 'leaky'}", f"act.after={self.prev}",
               f"act.on={len(self.shape)}d")
        self._add(("act", slope), "act")  # BN, its act, this act: a pool after this one is standalone
        return True

    def pool(self) -> bool:
        if len(self.shape) != 3 or self.shape[1] < 2 or self.shape[2] < 2:
            return False
        if self.after_bn is not None and self.after_bn[1]:
            return False  # it would be the BatchNorm's own pool
        C, H, W = self.shape
        self.f("node=pool", f"pool.after={self.prev}", f"pool.odd={H % 2 == 1 or W % 2 == 1}")
        self._add(("pool",), "pool")
        self.shape = (C, H // 2, W // 2)
        return True

    def gap(self) -> bool:
        if len(self.shape) != 3:
            return False
        self.f("node=gap", f"gap.after={self.prev}")
        self._add(("gap",), "gap")
        self.shape = (self.shape[0], 1, 1)
        return True

    def flatten(self) -> bool:
        self.f("node=flatten", f"flatten.of={len(self.shape)}d", f"flatten.after={self.prev}")
        self._add(("flatten",), "flatten")
        self.shape = (math.prod(self.shape),)
        return True

    def linear(self, fout: int) -> bool:
        """A Linear on the last dimension (of a flat vector, of [C, L], or of an image's rows)."""
        bias = self.rng.random() < 0.65
        self.f("node=linear", f"linear.bias={bias}", f"linear.after={self.prev}", f"linear.on={len(self.shape)}d")
        self._add(("linear", self.shape[-1], fout, bias), "linear")
        self._params(["linear"] * (2 if bias else 1))
        self.shape = self.shape[:-1] + (fout,)
        return True

    # -- parts -------------------------------------------------------------------------------------
    def conv_part(self) -> None:
        r = self.rng
        prefix = r.choice(("none", "none", "act", "pool", "bn"))
        if prefix != "none":
            getattr(self, prefix)()
        for _ in range(r.choice((1, 2, 2, 3))):
            self.conv(r.choice((2, 3, 4, 5)))
            post = r.choice(("bn", "bn", "act", "act+pool", "pool", "pool+act", "none", "bn+act", "bn+pool",
                             "act+act", "linear"))
            for step in post.split("+"):
                if step == "linear":
                    self.linear(r.choice((3, 4, 6)))  # on the image's last dimension: [C, H, W] -> [C, H, W']
                elif step != "none":
                    getattr(self, step)()
            self.maybe_identity()

    def image_head(self) -> None:
        """From [C, H, W] to a flat vector, or to the output (an image, MSE)."""
        r = self.rng
        head = r.choice(("flatten", "flatten", "gap", "gap", "end"))
        if head == "flatten":
            self.flatten()
        elif head == "end":
            if r.random() < 0.5:
                self.act(leaky=True)
            self.f("out=image")
        else:
            self.gap()
            then = r.choice(("flatten", "bn", "bn", "conv", "act", "end"))
            if then == "end":
                self.f("out=image")
                return
            done = then == "flatten" or (self.conv(r.choice((2, 3))) if then == "conv" else getattr(self, then)())
            self.f(f"gap.then={then if done else 'flatten'}")
            self.flatten()

    def vector_part(self, fout: int) -> None:
        r = self.rng
        if r.random() < 0.1:
            self.flatten()  # on an already flat input: a no-op
        for _ in range(r.choice((0, 1, 1, 2))):
            self.linear(r.choice((3, 4, 6, 7)))
            post = r.choice(("bn", "bn", "act", "act", "none", "bn+act", "act+act"))
            for step in post.split("+"):
                if step != "none":
                    getattr(self, step)()
            self.maybe_identity()
        self.linear(fout)
        tail = r.choice(("none",) * 6 + ("act", "bn"))
        if tail != "none" and (self.act(leaky=True) if tail == "act" else self.bn()):
            self.f(f"tail={tail}")
        self.f("out=vector")


def _nest(rng: random.Random, layers: List[Spec]) -> Tuple[List[Spec], bool]:
    """Wrap a contiguous run of layers (sometimes twice) in an inner nn.Sequential."""
    if len(layers) < 2 or rng.random() > 0.3:
        return layers, False
    a = rng.randrange(0, len(layers) - 1)
    b = rng.randrange(a + 1, len(layers) + 1)
    inner = layers[a:b]
    if len(inner) >= 3 and rng.random() < 0.4:
        inner = inner[:1] + [("seq", tuple(inner[1:]))]
    return layers[:a] + [("seq", tuple(inner))] + layers[b:], True


def _conv4(w: _Walk, ways: int) -> Tuple[Spec, Tuple[int, ...]]:
    """Conv4 (max-pool blocks, or stride-2 blocks and the mean over space): its spec and input."""
    r = w.rng
    max_pool = r.random() < 0.5
    blocks = r.choice((1, 2, 3))
    cin, hidden = r.choice((1, 2, 3)), r.choice((2, 3, 5))
    per_step = r.choice((None, None, 1, 2, 4))
    padding = "tf" if not max_pool and w.pad_rng.random() < 0.5 else "symmetric"
    side = r.choice((5, 6, 7, 8, 9))
    sizes, s = [], side
    for _ in range(blocks):
        if max_pool:
            sizes.append(s)
            s //= 2
        else:
            s = (s + 1) // 2
            sizes.append(s)
    if s < 1 or min(sizes) ** 2 * w.n_min < 3:
        blocks, sizes = 1, [side if max_pool else (side + 1) // 2]
    w.f("root=conv4", f"conv4.max_pool={max_pool}", "node=conv", "conv.k=3", f"conv.stride={1 if max_pool else 2}",
        "conv.pad=1", "conv.bias=True", f"conv.cin1={cin == 1}", "node=bn", "bn.affine=True", "bn.act=relu",
        f"bn.pool={max_pool}", f"bn.kind={'ps2d' if per_step else 'bn2d'}", "node=linear", "linear.bias=True",
        "out=vector", f"conv4.padding={padding}")
    if cin == 1 and (max_pool or padding == "symmetric" or side % 2 == 1):
        w.f("conv.cin1_k3p1=True")
    if per_step:
        w.f("bn.steps=" + ("S<K" if per_step < w.K else "S=K" if per_step == w.K else "S>K"))
    w.f("node=mean" if not max_pool else "node=flatten", "flatten.of=3d")
    if not max_pool:
        w.feats.discard("flatten.of=3d")
    for _ in range(blocks):
        w._params(["conv", "conv", "bn", "bn"])
    w._params(["linear", "linear"])
    return ("conv4", ways, hidden, cin, max_pool, side, blocks, per_step, padding), (cin, side, side)


def draw(seed: int) -> Case:
    """One random case: model, batch shapes and learner options, from ``seed`` alone."""
    r = random.Random(seed)
    T = r.choice((1, 2, 3, 4, 5))
    n_support, n_query = r.choice((1, 2, 3, 5)), r.choice((1, 3, 4))
    K = r.choice((1, 2, 3))
    loss = r.choice(("ce", "mse"))
    w = _Walk(r, min(n_support, n_query), K, pad_rng=random.Random(f"zero-padding {seed}"))
    fout = r.choice((2, 3, 5)) if loss == "ce" else r.choice((1, 2, 3))
    root = r.choice(("conv", "conv", "conv", "mlp", "seq", "conv4"))
    if root == "conv4":
        spec, in_shape = _conv4(w, fout)
        layers, out_shape = [spec], (fout,)
    else:
        w.f(f"root={root}")
        if root == "conv":
            H, W = r.choice((4, 5, 6, 7, 8, 9)), r.choice((4, 5, 6, 7, 8, 9))
            w.shape = in_shape = (r.choice((1, 2, 3)), H, W)
            w.f(f"input.rect={H != W}")
            w.conv_part()
            w.image_head()
        elif root == "mlp":
            w.shape = in_shape = (r.choice((3, 4, 6)),)
            prefix = r.choice(("none", "none", "act", "bn"))
            if prefix != "none":
                getattr(w, prefix)()
        else:  # a BatchNorm1d / per-step dims=1 block or an activation on [C, L] examples, then Flatten
            w.shape = in_shape = (r.choice((2, 3)), r.choice((3, 4)))
            if r.random() < 0.3:
                w.linear(r.choice((3, 4)))  # on the last dimension: [C, L] -> [C, L']
            if not (r.random() < 0.75 and w.bn()):
                w.act()
            if r.random() < 0.2:
                w.linear(r.choice((3, 4)))
                w.f("out=seq")
            else:
                w.flatten()
        if len(w.shape) == 1:
            w.vector_part(fout)
        else:
            loss = "mse"
        layers, nested = _nest(r, w.layers)
        if nested:
            w.f("module=nested")
        out_shape = w.shape
    if loss == "ce" and len(out_shape) != 1:
        loss = "mse"
    w.f(f"loss={loss}")

    first_order = r.random() < 0.35
    adapt_bn = r.random() < 0.5
    lr_mode = r.choice(LR_MODES)
    learn_lr = r.random() < 0.6
    memory = r.choice(("store", "store0", "recompute"))
    chunk_kind = r.choice(("none", "none", "even", "partial"))
    task_chunk = None
    if chunk_kind == "partial" and T >= 3:
        task_chunk = r.choice([c for c in range(2, T) if T % c])
    elif chunk_kind == "even" and T >= 2:
        task_chunk = r.choice([c for c in range(1, T) if T % c == 0])
    else:
        chunk_kind = "none"
    weights = None
    if K >= 2 and r.random() < 0.35:
        weights = tuple([round(r.uniform(0.1, 0.6), 3) if r.random() < 0.7 else 0.0 for _ in range(K - 1)]
                        + [round(r.uniform(0.6, 1.0), 3)])

    # which parameters are frozen (requires_grad=False) and which the inner loop adapts
    P = w.nparams
    plain = [i for i in range(P) if i not in w.bn_params]
    adapt = r.choice(("all", "all", "head", "subset"))
    frozen: Tuple[int, ...] = ()
    if r.random() < 0.35:
        keep = set(w.head) if adapt == "head" else set()
        options = [i for i in range(P) if i not in keep and not (i in plain and len(plain) == 1)]
        if options:
            frozen = (r.choice(options),)
    trainable = [i for i in range(P) if i not in frozen]
    pick: Tuple[int, ...] = ()
    if adapt == "subset":
        n = r.randint(1, len(trainable))
        pick = tuple(sorted(r.sample(trainable, n)))
    frozen_kind = w.kind_of_param[frozen[0]] if frozen else "none"

    w.f(f"T={T}", f"n_support={min(n_support, 3)}", f"n_query={min(n_query, 3)}", f"K={K}",
        f"first_order={first_order}", f"adapt_bn={adapt_bn}", f"lr_mode={lr_mode}", f"learn_lr={learn_lr}",
        f"memory={memory}", f"task_chunk={chunk_kind}", f"multi_step={weights is not None}", f"adapt={adapt}",
        f"frozen={frozen_kind}")
    return Case(seed, tuple(layers), tuple(in_shape), tuple(out_shape), loss, T, n_support, n_query, K,
                first_order, adapt_bn, lr_mode, learn_lr, memory, task_chunk, weights, adapt, pick, w.head,
                frozen, frozenset(w.feats))


# -- pairwise selection ----------------------------------------------------------------------------

def pairs_of(features: Sequence[FrozenSet[str]]) -> set:
    """Every (a, b), a < b, of features that occur together in one case."""
    out = set()
    for fs in features:
        s = sorted(fs)
        out.update((a, b) for i, a in enumerate(s) for b in s[i + 1:])
    return out


def select(n: int, pool: int, first_seed: int = 0) -> Tuple[List[Case], List[Case], int]:
    """(the sample, the pool, how many of the sample's first cases the cover took): greedy pairwise
    cover of the pool's feature pairs, topped up to ``n`` with the pool's other cases in seed order."""
    cases = [draw(first_seed + i) for i in range(pool)]
    names = sorted(set().union(*(c.features for c in cases)))
    index = {f: i for i, f in enumerate(names)}
    X = torch.zeros(len(cases), len(names))
    for i, c in enumerate(cases):
        X[i, [index[f] for f in c.features]] = 1.0
    upper = torch.ones(len(names), len(names)).triu(1)
    uncovered = ((X.t() @ X) > 0).float() * upper
    chosen: List[int] = []
    while uncovered.any():
        gains = ((X @ uncovered) * X).sum(1)
        i = int(torch.argmax(gains))  # the first best: deterministic
        chosen.append(i)
        uncovered *= 1.0 - torch.outer(X[i], X[i])
    picked, n_cover = set(chosen), len(chosen)
    for i in range(len(cases)):
        if len(chosen) >= n:
            break
        if i not in picked:
            chosen.append(i)
    return [cases[i] for i in chosen], cases, n_cover


# -- building ------------------------------------------------------------------------------------

def _module(spec: Spec) -> nn.Module:
    kind = spec[0]
    if kind == "conv":
        _, cin, cout, k, s, p, bias = spec
        return nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=bias)
    if kind == "zpad":
        return nn.ZeroPad2d(tuple(spec[1:]))
    if kind == "bn":
        _, bn_kind, C, affine, eps, S, track = spec
        if bn_kind.startswith("ps"):
            return PerStepBatchNorm(C, S, dims=2 if bn_kind == "ps2d" else 1, eps=eps, affine=affine)
        cls = nn.BatchNorm2d if bn_kind == "bn2d" else nn.BatchNorm1d
        return cls(C, eps=eps, affine=affine, track_running_stats=track)
    if kind == "act":
        return nn.ReLU() if spec[1] == 0.0 else nn.LeakyReLU(spec[1])
    if kind == "pool":
        return nn.MaxPool2d(2)
    if kind == "gap":
        return nn.AdaptiveAvgPool2d(1)
    if kind == "flatten":
        return nn.Flatten()
    if kind == "linear":
        _, fin, fout, bias = spec
        return nn.Linear(fin, fout, bias=bias)
    if kind == "id":
        return nn.Identity()
    if kind == "seq":
        return nn.Sequential(*[_module(s) for s in spec[1]])
    if kind == "conv4":
        _, ways, hidden, cin, max_pool, side, blocks, S, padding = spec
        return Conv4(ways, hidden=hidden, in_channels=cin, max_pool=max_pool, image_size=side, blocks=blocks,
                     per_step_bn=S, padding=padding)
    raise ValueError(f"unknown layer spec {spec!r}")


def build_model(case: Case, dtype: torch.dtype = torch.float64, randomize: bool = True,
                variant: int = 0) -> nn.Module:
    """The case's model in ``dtype``; ``randomize``: every parameter redrawn from the case's seed and
    ``variant`` (weights ~ N(0, 1 / fan_in), BatchNorm scales 1 + N(0, 0.3^2) (per-step rows differ),
    biases N(0, 0.2^2)); the case's frozen parameters set requires_grad=False."""
    layers = case.layers
    model = _module(layers[0]) if layers[0][0] == "conv4" else nn.Sequential(*[_module(s) for s in layers])
    model = model.to(dtype)
    if randomize:
        g = torch.Generator().manual_seed(10_000 + case.seed + 1_000_003 * variant)
        with torch.no_grad():
            for m in model.modules():
                for name, p in m.named_parameters(recurse=False):
                    is_bn = isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, PerStepBatchNorm))
                    noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
                    if is_bn and name == "weight":
                        val = 1.0 + 0.3 * noise
                    elif name == "bias":
                        val = 0.2 * noise
                    else:
                        fan_in = p[0].numel()
                        val = noise / math.sqrt(fan_in)
                    p.copy_(val.to(dtype))
    params = [p for _, p in model.named_parameters()]
    for i in case.frozen:
        params[i].requires_grad_(False)
    return model


def param_names(model: nn.Module, indices: Sequence[int]) -> List[str]:
    names = [n for n, _ in model.named_parameters()]
    return [names[i] for i in indices]


def batch(case: Case, dtype: torch.dtype = torch.float64) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(support_x, support_y, query_x, query_y): inputs with a per-feature scale in [0.5, 1.5) and
    shift N(0, 0.3^2), so no two features look alike; class labels uniform (some classes may be
    absent from a task), regression targets N(0, 1)."""
    g = torch.Generator().manual_seed(20_000 + case.seed)
    scale = 0.5 + torch.rand(case.in_shape, generator=g, dtype=torch.float64)
    shift = 0.3 * torch.randn(case.in_shape, generator=g, dtype=torch.float64)

    def xs(n: int) -> Tensor:
        return (torch.randn(case.T, n, *case.in_shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)

    def ys(n: int) -> Tensor:
        if case.loss == "ce":
            return torch.randint(0, case.out_shape[0], (case.T, n), generator=g)
        return torch.randn(case.T, n, *case.out_shape, generator=g, dtype=torch.float64).to(dtype)

    sx, sy = xs(case.n_support), ys(case.n_support)
    qx, qy = xs(case.n_query), ys(case.n_query)
    return sx, sy, qx, qy


def learner_kwargs(case: Case, model: nn.Module) -> Dict[str, object]:
    """The fastmaml.MAML arguments of the case (the same for the oracle and the fused path)."""
    kw: Dict[str, object] = dict(inner_lr=0.1, inner_steps=case.K, first_order=case.first_order,
                                 adapt_bn=case.adapt_bn, lr_mode=case.lr_mode, learn_lr=case.learn_lr,
                                 task_chunk=case.task_chunk,
                                 multi_step_weights=None if case.weights is None else list(case.weights))
    kw["memory"] = "recompute" if case.memory == "recompute" else "store"
    if case.memory == "store0":
        kw["store_budget"] = 0
    if case.adapt == "head":
        kw["adapt"] = param_names(model, case.head)
    elif case.adapt == "subset":
        kw["adapt"] = param_names(model, case.adapt_pick)
    return kw


def random_rates(lr: Tensor, seed: int, scale: float = 1.0) -> None:
    """Every inner rate redrawn in scale * [0.02, 0.12), all different (a rate read at the wrong step,
    layer or element shows), learnable or not."""
    g = torch.Generator().manual_seed(30_000 + seed)
    with torch.no_grad():
        lr.copy_((scale * (0.02 + 0.1 * torch.rand(lr.shape, generator=g, dtype=torch.float64))).to(lr.dtype))
