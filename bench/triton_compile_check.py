"""Compile every Triton kernel of fastmaml for CUDA targets without a GPU, and check that each can launch.

    python bench/triton_compile_check.py                      # sm_80 and sm_90, a table, exit 1 on a failure
    python bench/triton_compile_check.py --targets sm_90 --json out.json --jobs 2
    python bench/triton_compile_check.py --list               # the launches it compiles, compiles nothing

Which launches. The public launchers of the modules of ``fastmaml.triton`` (ops, layers, cg_ops) are called
with small CPU tensors (``scenarios()``) while each kernel object in its module is replaced by a recorder
that keeps the arguments and runs nothing. So the kernels get exactly the constexprs, ``num_warps``,
pointer dtypes and integer specializations (an int equal to 1 becomes a constexpr, a multiple of 16
gets a divisibility hint) that the launchers give them: Triton's own argument binder computes the
signature (``JITFunction._pack_args``). GPU-only launcher choices are reached through the hooks the tests
patch too: ``ops._config`` (tasks split over programs, ``SPLIT``), ``layers.conv._CONV_SPLIT``. There is no
``triton.autotune`` in the package; a kernel that gains one must get its configs here.
By default every value of every launcher choice (constexpr branch, BLOCK / num_warps, dtype, int
specialization) is compiled at least once, in float32 and float64 (``_variants``: the widest
configuration, then one choice changed at a time); float16 / bfloat16 (also accepted) in the widest
configuration, except the convolution. ``--full``: every combination (about 1,400 launches, long).

Which checks. Each distinct launch is compiled with ``triton.compile(ASTSource(...), target=GPUTarget(
"cuda", arch, 32))`` down to a cubin (ptxas ships with the triton wheel). It fails on a compile error, or
when the kernel could not launch on the target (``TARGETS``):
  shared    metadata.shared + ptxas' static smem  >  the target's opt-in shared memory per block
  regs      num_warps * roundup(32 * regs, 256)   >  65,536 registers per block (ptxas' per-warp
            allocation unit is 256 registers); regs > 255 per thread
  threads   num_warps * 32                        >  1,024
Registers, spills (ptxas' spill stores) and shared bytes come from ptxas' ``-v`` log and the kernel's
metadata. Triton declares the block size to ptxas, which then keeps registers within the block's budget
by spilling, so the register rule is a guard; spills are reported, and fail the check only with
``--max-spills``. The table's config: pointer dtypes, the launcher's constexprs (``NAME:=1``: a runtime int
Triton made a constant because it was 1), num_warps, ``16|NAMES``: the ints with a divisible-by-16 hint.

Also checked: every module-level ``@triton.jit`` function of these modules is a launched kernel or is
called (directly or not) by one, so a new kernel without a scenario fails the check.

Triton is imported with ``TRITON_INTERPRET`` removed (the interpreter's kernels cannot be compiled), and
compiles into a fresh temporary cache (``--cache-dir`` to keep one), so every run really runs ptxas.
Cost (triton 3.9): 174 launches x 2 targets, about 130 s of CPU, a third of it the convolution's
weight gradient (255 registers and spills at 64 x 64 tiles); ``--jobs 2`` on 2 idle cores about 70 s.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import itertools
import json
import os
import re
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kernel_modules() -> List[str]:
    """Every module of the package ``fastmaml.triton``, subpackages included (ops, cg_ops and the modules of
    the layers package, one per layer family, today; a new one is checked too)."""
    import pkgutil

    import fastmaml.triton as package

    return sorted(m.name for m in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."))


@dataclass(frozen=True)
class Target:
    """What one CUDA architecture lets a kernel launch with."""

    name: str
    arch: int  # compute capability, 80 = sm_80
    max_shared: int  # bytes of shared memory per block (the opt-in maximum)
    regs_per_block: int
    max_regs_per_thread: int
    max_threads: int


TARGETS: Dict[str, Target] = {
    "sm_80": Target("sm_80", 80, 163 * 1024, 65536, 255, 1024),  # A100
    "sm_90": Target("sm_90", 90, 227 * 1024, 65536, 255, 1024),  # H100 / H200
}
WARP_SIZE = 32
REG_ALLOC_UNIT = 256  # registers are given to a warp in units of 256


# ---------------------------------------------------------------------------------------------------
# Triton, imported for compiling
# ---------------------------------------------------------------------------------------------------


def _import_triton(cache_dir: str):
    """Import triton for compiling (not interpreting), its cache in ``cache_dir``, every compile running
    ptxas with its ``-v`` log printed."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("triton_compile_check: triton was already imported with TRITON_INTERPRET=1, so its "
                           "kernels are interpreter objects that cannot be compiled; run it in its own process")
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cache hit would skip ptxas and its register count
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, without its warning
    import triton

    return triton


# ---------------------------------------------------------------------------------------------------
# The launches: the launchers called with recorders in place of the kernels
# ---------------------------------------------------------------------------------------------------


@dataclass
class Launch:
    """One kernel launch as a launcher issued it: the kernel and its arguments."""

    module: str
    kernel: str
    args: tuple
    kwargs: dict
    scenario: str


class _Recorder:
    """Stands in for a kernel in its module: ``kernel[grid](*args, **kwargs)`` records the launch and runs
    nothing (the outputs of the launcher stay uninitialised, which no scenario reads)."""

    def __init__(self, module: str, kernel: str, sink: List[Launch]):
        self.module, self.kernel, self.sink = module, kernel, sink
        self.scenario = ""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.module, self.kernel, args, kwargs, self.scenario))

        return launch


def jit_functions(module) -> Dict[str, object]:
    """The module-level ``@triton.jit`` functions of ``module``, by name."""
    from triton.runtime.jit import JITFunction

    return {name: obj for name, obj in vars(module).items()
            if isinstance(obj, JITFunction) and obj.__module__ == module.__name__}


def called_jit_functions(fn, table: Dict[str, object]) -> set:
    """Names in ``table`` that ``fn``'s source calls, directly or through other functions of ``table``."""
    seen: set = set()
    todo = [fn]
    while todo:
        tree = ast.parse(todo.pop().src)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                name = node.func.id
                if name in table and name not in seen:
                    seen.add(name)
                    todo.append(table[name])
    return seen


def _variants(dims: Dict[str, list], full: bool) -> Iterator[dict]:
    """Combinations of the values in ``dims``: all of them when ``full``; else the base (every dimension at
    its first value, the widest configuration) and, for each dimension, each other value with the rest at
    the base, so that every value (every constexpr branch) is compiled at least once."""
    names = list(dims)
    if full:
        for combo in itertools.product(*(dims[n] for n in names)):
            yield dict(zip(names, combo))
        return
    base = {n: dims[n][0] for n in names}
    yield dict(base)
    for n in names:
        for v in dims[n][1:]:
            yield {**base, n: v}


def _dtype_variants(dims: Dict[str, list], full: bool, half: bool = True) -> Iterator[Tuple[str, dict]]:
    """(dtype, variant): the variants of ``dims`` in float32 and float64; in float16 and bfloat16 (which the
    launchers accept too) only the base, unless ``full``; none when not ``half`` and not ``full``."""
    for dname in FULL_DTYPES:
        for v in _variants(dims, full):
            yield dname, v
    if half or full:
        for dname in HALF_DTYPES:
            for v in (_variants(dims, True) if full else [{n: dims[n][0] for n in dims}]):
                yield dname, v


@contextlib.contextmanager
def _split_tasks(ops, split: bool):
    """With ``split``, divide the tasks over two programs per column block, as ``ops._config`` does on a GPU
    where the column blocks alone would not fill it (the hook the tests patch too)."""
    original = ops._config
    if split:
        ops._config = lambda P, T, device: (ops._BLOCK, max(1, (T + 1) // 2))
    try:
        yield
    finally:
        ops._config = original


@contextlib.contextmanager
def _conv_split(layers, split: int):
    """Split each image's pixel blocks over ``split`` programs, as the weight gradient does on a GPU (the
    setting lives in the family's module, ``layers.conv``)."""
    original = layers.conv._CONV_SPLIT
    layers.conv._CONV_SPLIT = split
    try:
        yield
    finally:
        layers.conv._CONV_SPLIT = original


FULL_DTYPES = ("float32", "float64")  # every branch value, in the default tier too
HALF_DTYPES = ("float16", "bfloat16")  # accepted by the launchers: the base configuration (all with --full)


def scenarios(full: bool = False) -> Iterator[Tuple[str, Callable[[], object]]]:
    """(label, call) pairs: launcher calls on CPU tensors that reach every constexpr branch, every launch
    configuration (BLOCK, num_warps) and the integer specializations the launchers produce. ``full``: every
    combination (see ``_variants``)."""
    import torch
    from fastmaml.triton import cg_ops, layers, ops

    def lr_form(form: str, P: int, d):
        """(lr, segments): 0-d, per segment (4 runs of ids, as parameter tensors give), per element."""
        if form == "0d":
            return torch.tensor(0.1, dtype=d), None
        if form == "segment":
            sizes = torch.tensor([P // 4, P // 4, P // 4, P - 3 * (P // 4)])
            return torch.rand(4, dtype=d), torch.repeat_interleave(torch.arange(4), sizes)
        return torch.rand(P, dtype=d), None

    def label(name, dname, v):
        return f"{name} {dname} " + " ".join(f"{k}={x}" for k, x in v.items())

    # --- fused element-wise ops on the [T, P] layout. (T, P) = (32, 4096): every int a multiple of 16
    # (vectorized); (5, 1000): none; a [P] operand on both sides gives T = 1, which Triton makes a constant.
    shapes = [(32, 4096), (5, 1000)]
    forms = ["segment", "0d", "element"]
    for dname, v in _dtype_variants({"lr": forms, "theta": ["TP", "P"], "grad": ["TP", "P"], "TP": shapes}, full):
        d = getattr(torch, dname)
        (T, P), lr, seg = v["TP"], *lr_form(v["lr"], v["TP"][1], d)
        theta = torch.rand(T, P, dtype=d) if v["theta"] == "TP" else torch.rand(P, dtype=d)
        grad = torch.rand(T, P, dtype=d) if v["grad"] == "TP" else torch.rand(P, dtype=d)
        yield label("inner_update", dname, v), lambda a=(theta, grad, lr, seg): ops.inner_update(*a)
    for dname, v in _dtype_variants({"lr": forms, "v": ["TP", "P"], "TP": shapes}, full):
        d = getattr(torch, dname)
        (T, P), lr, seg = v["TP"], *lr_form(v["lr"], v["TP"][1], d)
        x = torch.rand(T, P, dtype=d) if v["v"] == "TP" else torch.rand(P, dtype=d)
        yield label("scale", dname, v), lambda a=(x, lr, seg): ops.scale(*a)
    for dname, v in _dtype_variants({"lr": forms, "split": [True, False], "a": ["TP", "P"], "TP": shapes}, full):
        d = getattr(torch, dname)
        (T, P), lr, seg = v["TP"], *lr_form(v["lr"], v["TP"][1], d)
        x = torch.rand(T, P, dtype=d) if v["a"] == "TP" else torch.rand(P, dtype=d)
        yield label("segment_dot", dname, v), lambda a=(x, x, lr, seg), s=v["split"]: _in(
            _split_tasks(ops, s), ops.segment_dot, *a)
    for dname, v in _dtype_variants({"lr": forms, "split": [True, False], "hv": [True, False],
                                     "gq": [True, False], "TP": shapes}, full):
        d = getattr(torch, dname)
        (T, P), lr, seg = v["TP"], *lr_form(v["lr"], v["TP"][1], d)
        x = torch.rand(T, P, dtype=d)
        args = (x, x if v["hv"] else None, x, x if v["gq"] else None, 0.5, lr, seg)
        yield label("reverse_step", dname, v), lambda a=args, s=v["split"]: _in(_split_tasks(ops, s), ops.reverse_step, *a)

    # --- conjugate-gradient vector updates: BLOCK = min(1024, next_power_of_2(max(P, 16))); P gives every value.
    for dname, v in _dtype_variants({"P": [4096, 10, 20, 40, 100, 200, 400]}, full):
        d = getattr(torch, dname)
        x, coef = torch.rand(5, v["P"], dtype=d), torch.rand(5, dtype=d)
        yield label("cg_step", dname, v), lambda x=x, c=coef: cg_ops.cg_step(x, x, x, x, c)
        yield label("cg_direction", dname, v), lambda x=x, c=coef: cg_ops.cg_direction(x, x, c)

    # --- BatchNorm + activation + pool: (BLOCK, num_warps) = layers.batchnorm._bn_config(N H W); the shapes
    # (N, C, H, W) give every BLOCK from 1024 (Omniglot's 28x28 first block) down to 32. gamma, beta, u_gamma are views of
    # the [T, P] fast weights, as the engine passes them (a stride of 1 becomes a constant).
    bn_shapes = [(5, 8, 28, 28), (5, 8, 10, 10), (5, 8, 7, 7), (5, 8, 5, 5), (5, 8, 3, 3), (5, 8, 2, 2)]
    flags = [True, False]
    for dname, v in _dtype_variants({"NCHW": bn_shapes, "pool": [2, 0], "f1": flags, "f2": flags, "f3": flags}, full):
        d = getattr(torch, dname)
        (N, C, H, W), pool, T = v["NCHW"], v["pool"], 4
        Ho, Wo = (H, W) if pool == 0 else (H // 2, W // 2)
        z = torch.rand(T, N, C, H, W, dtype=d)
        flat = torch.rand(T, 3 * C + 7, dtype=d)
        g, b, ug = flat[:, 3:3 + C], flat[:, 3 + C:3 + 2 * C], flat[:, 3 + 2 * C:3 + 3 * C]
        stat = torch.rand(T, C, dtype=d)
        out = torch.rand(T, N, C, Ho, Wo, dtype=d)
        idx = torch.zeros(T, N, C, Ho, Wo, dtype=torch.uint8) if pool else None
        f1, f2, f3 = v["f1"], v["f2"], v["f3"]
        if f1 and f2 and f3:  # the forward and backward have no flags
            tag = label("", dname, {"NCHW": v["NCHW"], "pool": pool})
            yield "bn_act_pool_forward" + tag, lambda a=(z, g, b, 1e-5, 0.0, pool): layers.bn_act_pool_forward(*a)
            yield ("bn_act_pool_backward" + tag,
                   lambda a=(out, z, stat, stat, g, b, idx, 0.0, pool): layers.bn_act_pool_backward(*a))
        yield (label("bn_act_pool_rforward", dname, {**v, "f1": f"rz={f1}", "f2": f"ugamma={f2}", "f3": f"ubeta={f3}"}),
               lambda a=(z if f1 else None, z, stat, stat, g, b, ug if f2 else None, b if f3 else None, idx, 0.0, pool):
               layers.bn_act_pool_rforward(*a))
        yield (label("bn_act_pool_rbackward", dname, {**v, "f1": f"rdout={f1}", "f2": f"rz={f2}", "f3": f"ugamma={f3}"}),
               lambda a=(out, out if f1 else None, z, z if f2 else None, stat, stat, stat, stat, g, b,
                         ug if f3 else None, idx, 0.0, pool): layers.bn_act_pool_rbackward(*a))

    # --- the one-input-channel 3x3 convolution, padding 1 (Omniglot's first layer, 28x28; stride 1 before a
    # max-pool, 2 without): OB = next_power_of_2(O) channels per program, 8 warps when OB * 64 pixels > 4096.
    # Its kernels take long to compile (the weight gradient in float64 about 15 s of CPU per target), so the
    # default tier compiles them in float32 and float64 only.
    T, N, H = 4, 5, 28
    for dname, v in _dtype_variants({"O": [64, 128], "stride": [1, 2], "bias": [True, False]}, full, half=False):
        d = getattr(torch, dname)
        x, w = torch.rand(T, N, 1, H, H, dtype=d), torch.rand(T, v["O"], 1, 3, 3, dtype=d)
        bias = torch.rand(T, v["O"], dtype=d) if v["bias"] else None
        yield (label("conv2d_cin1_forward", dname, v),
               lambda a=(x, w, bias, v["stride"], 1): layers.conv2d_cin1_forward(*a))
    # The weight gradient: the pixel blocks of an image split over SPLIT programs on a GPU (a runtime int;
    # 1, a constant, when T N alone fill it). Default tier: the base only (O = 64, stride 1, split).
    wgrad_dims = {"O": [64, 128], "stride": [1, 2], "split": [3, 1]}
    for dname, v in (_dtype_variants(wgrad_dims, True) if full else
                     ((dn, {n: wgrad_dims[n][0] for n in wgrad_dims}) for dn in FULL_DTYPES)):
        d = getattr(torch, dname)
        Ho = (H + 2 - 3) // v["stride"] + 1
        x, dy = torch.rand(T, N, 1, H, H, dtype=d), torch.rand(T, N, v["O"], Ho, Ho, dtype=d)
        yield (label("conv2d_cin1_weight_grad", dname, v),
               lambda a=(dy, x, v["stride"], 1), s=v["split"]: _in(_conv_split(layers, s),
                                                                   layers.conv2d_cin1_weight_grad, *a))


def _in(ctx, fn, *args):
    with ctx:
        return fn(*args)


def record_launches(full: bool = False) -> List[Launch]:
    """Every launch of ``scenarios(full)``, in order (duplicates included)."""
    import importlib

    sink: List[Launch] = []
    swapped = []
    for mod_name in kernel_modules():
        mod = importlib.import_module(mod_name)
        table = jit_functions(mod)
        helpers = set().union(*(called_jit_functions(f, table) for f in table.values())) if table else set()
        for name in sorted(set(table) - helpers):
            swapped.append((mod, name, table[name]))
            setattr(mod, name, _Recorder(mod_name, name, sink))
    try:
        for label, call in scenarios(full):
            for mod, name, _ in swapped:
                getattr(mod, name).scenario = label
            call()
    finally:
        for mod, name, fn in swapped:
            setattr(mod, name, fn)
    return sink


# ---------------------------------------------------------------------------------------------------
# Specializing and compiling one launch
# ---------------------------------------------------------------------------------------------------


@dataclass
class Spec:
    """A launch as the compiler sees it: signature, constexprs, divisibility attributes, options."""

    module: str
    kernel: str
    signature: Dict[str, str]
    constexprs: dict
    attrs: dict
    options: dict  # the launch's compile options (num_warps ...)
    scenario: str

    def key(self) -> str:
        return repr((self.module, self.kernel, sorted(self.signature.items()),
                     sorted((k, repr(v)) for k, v in self.constexprs.items()),
                     sorted((k, repr(v)) for k, v in self.attrs.items()), sorted(self.options.items())))

    def config(self) -> str:
        """A short description: pointer dtypes, the launcher's constexprs, num_warps, the specialized ints."""
        import inspect

        fn = _kernel_object(self.module, self.kernel)
        params = list(inspect.signature(fn.fn).parameters)
        ptrs = sorted({t[1:] for t in self.signature.values() if t.startswith("*")})
        named = {params[k[0]]: v for k, v in self.constexprs.items()}
        marked = [name for name, ty in self.signature.items() if ty == "constexpr"]
        consts = []
        for name in marked:
            v = named.get(name)
            if name in self._launcher_constexprs(fn):
                consts.append(f"{name}={getattr(v, 'name', v)}")
            else:
                consts.append(f"{name}:={v}")  # a runtime int the binder turned into a constant (== 1)
        ints = [params[k[0]] for k, v in self.attrs.items() if v and self.signature[params[k[0]]][0] == "i"]
        parts = ["/".join(ptrs), " ".join(consts), f"warps={self.options.get('num_warps', 4)}"]
        if ints:
            parts.append("16|" + ",".join(ints))
        return " ".join(p for p in parts if p)

    @staticmethod
    def _launcher_constexprs(fn) -> set:
        return {p.name for p in fn.params if p.is_constexpr}


def _kernel_object(module: str, kernel: str):
    import importlib

    return getattr(importlib.import_module(module), kernel)


def specialize(launch: Launch) -> Spec:
    """The signature, constexprs and attributes Triton's runtime derives from this launch's arguments
    (its own binder and ``_pack_args``; divisibility and ==1 specialization do not depend on the target)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _kernel_object(launch.module, launch.kernel)
    backend = make_backend(GPUTarget("cuda", 90, WARP_SIZE))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, _ = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, None)
    compile_options = {k: v for k, v in launch.kwargs.items() if k not in fn.arg_names}
    return Spec(launch.module, launch.kernel, signature, constexprs, attrs, compile_options, launch.scenario)


def distinct_specs(launches: Sequence[Launch]) -> List[Spec]:
    """One Spec per distinct (kernel, signature, constexprs, attributes, options), first-seen order."""
    out: Dict[str, Spec] = {}
    for launch in launches:
        spec = specialize(launch)
        out.setdefault(spec.key(), spec)
    return list(out.values())


@dataclass
class Result:
    kernel: str
    config: str
    target: str
    regs: Optional[int]
    spills: Optional[int]  # bytes of spill stores
    shared: Optional[int]  # bytes: dynamic (Triton's) + static (ptxas)
    ok: bool
    why: str  # "" when ok
    seconds: float  # wall-clock
    cpu_seconds: float  # this process's and ptxas' CPU time
    scenario: str


def _cpu_seconds() -> float:
    """CPU seconds of this process and its waited-for children (ptxas)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


_PTXAS = {"regs": r"Used (\d+) registers", "spills": r"(\d+) bytes spill stores", "smem": r"(\d+) bytes smem"}


def parse_ptxas_log(log: str) -> Dict[str, int]:
    """Registers, spill-store bytes and static shared bytes of the (one) function in a ``ptxas -v`` log."""
    found = {}
    for key, pattern in _PTXAS.items():
        values = [int(v) for v in re.findall(pattern, log)]
        if key == "regs" and len(values) != 1:
            raise ValueError(f"expected one 'Used N registers' line in the ptxas log, found {len(values)}:\n{log}")
        found[key] = max(values, default=0)
    return found


def launch_problems(target: Target, num_warps: int, regs: int, shared: int, max_spills: Optional[int],
                    spills: int) -> List[str]:
    """Why a kernel with these resources cannot launch on ``target`` (empty: it can)."""
    threads = num_warps * WARP_SIZE
    block_regs = num_warps * -(-regs * WARP_SIZE // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    problems = []
    if threads > target.max_threads:
        problems.append(f"{threads} threads > {target.max_threads}")
    if regs > target.max_regs_per_thread:
        problems.append(f"{regs} registers per thread > {target.max_regs_per_thread}")
    if block_regs > target.regs_per_block:
        problems.append(f"{block_regs} registers per block ({num_warps} warps x {regs}) > {target.regs_per_block}")
    if shared > target.max_shared:
        problems.append(f"{shared} bytes of shared memory > {target.max_shared} ({target.name})")
    if max_spills is not None and spills > max_spills:
        problems.append(f"{spills} bytes of register spills > --max-spills {max_spills}")
    return problems


def error_summary(exc: BaseException) -> str:
    """One line for a compile error: Triton's ``at L:C:``, the offending source line (the one above the
    caret) and the message after it; for other errors their last lines (ptxas' own message)."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    caret = [i for i, ln in enumerate(lines) if ln.strip() == "^"]
    if caret:
        i = caret[0]
        picked = lines[:1] + [lines[i - 1].strip()] + lines[i + 1:]
    else:
        picked = lines[:1] + lines[-3:] if len(lines) > 4 else lines
    return f"{type(exc).__name__}: " + " | ".join(picked)[:500]


def compile_spec(spec: Spec, target: Target, max_spills: Optional[int]) -> Result:
    """Compile ``spec`` for ``target`` down to a cubin and check its resources against the target."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel_object(spec.module, spec.kernel)
    start, cpu0 = time.perf_counter(), _cpu_seconds()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # ptxas' -v log (TRITON_DUMP_PTXAS_LOG)
            compiled = triton.compile(ASTSource(fn, spec.signature, spec.constexprs, spec.attrs),
                                      target=GPUTarget("cuda", target.arch, WARP_SIZE), options=dict(spec.options))
        usage = parse_ptxas_log(log.getvalue())
    except Exception as exc:  # a compile error is the finding, reported in the table
        return Result(spec.kernel, spec.config(), target.name, None, None, None, False,
                      "compile error: " + error_summary(exc), time.perf_counter() - start,
                      _cpu_seconds() - cpu0, spec.scenario)
    shared = int(compiled.metadata.shared or 0) + usage["smem"]
    problems = launch_problems(target, compiled.metadata.num_warps, usage["regs"], shared, max_spills, usage["spills"])
    return Result(spec.kernel, spec.config(), target.name, usage["regs"], usage["spills"], shared, not problems,
                  "; ".join(problems), time.perf_counter() - start, _cpu_seconds() - cpu0, spec.scenario)


# ---------------------------------------------------------------------------------------------------
# Worker processes: each rebuilds the list of specs (cheap, deterministic) and compiles its share
# ---------------------------------------------------------------------------------------------------

_WORKER_SPECS: Dict[str, Spec] = {}


def _worker_init(cache_dir: str, full: bool) -> None:
    sys.path.insert(0, REPO)
    _import_triton(cache_dir)
    _WORKER_SPECS.update((spec.key(), spec) for spec in distinct_specs(record_launches(full)))


def _worker_compile(job: Tuple[str, str, Optional[int]]) -> dict:
    key, target, max_spills = job
    if key not in _WORKER_SPECS:
        raise RuntimeError(f"a worker process recorded other launches than its parent; missing: {key}")
    return asdict(compile_spec(_WORKER_SPECS[key], TARGETS[target], max_spills))


def coverage_problems(launches: Sequence[Launch]) -> List[str]:
    """Module-level @triton.jit functions that none of ``launches`` launches and no launched kernel calls."""
    import importlib

    launched = {(l.module, l.kernel) for l in launches}
    problems = []
    for mod_name in kernel_modules():
        table = jit_functions(importlib.import_module(mod_name))
        reached = {k for (m, k) in launched if m == mod_name}
        for name in list(reached):
            reached |= called_jit_functions(table[name], table)
        for name in sorted(set(table) - reached):
            problems.append(f"{mod_name}.{name} is a @triton.jit function that no scenario launches (add one to "
                            f"scenarios() in bench/triton_compile_check.py)")
    return problems


def run_check(specs: Sequence[Spec], targets: Sequence[str], jobs: int, max_spills: Optional[int],
              cache_dir: str, full: bool) -> List[Result]:
    """Compile every spec for every target; the results in (spec, target) order."""
    if jobs <= 1:
        return [compile_spec(spec, TARGETS[t], max_spills) for spec in specs for t in targets]
    work = [(spec.key(), t, max_spills) for spec in specs for t in targets]
    import multiprocessing

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                             initargs=(cache_dir, full)) as pool:
        return [Result(**r) for r in pool.map(_worker_compile, work)]


def format_table(results: Sequence[Result]) -> str:
    head = ("kernel", "config", "target", "regs", "spills", "shared", "ok")
    rows = [(r.kernel, r.config, r.target, "-" if r.regs is None else str(r.regs),
             "-" if r.spills is None else str(r.spills), "-" if r.shared is None else str(r.shared),
             "ok" if r.ok else "FAIL") for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS),
                    help="CUDA architectures to compile for (default: all)")
    ap.add_argument("--jobs", type=int, default=1, help="compiler processes (default 1)")
    ap.add_argument("--full", action="store_true",
                    help="every combination of the launchers' choices, not one value at a time (long)")
    ap.add_argument("--max-spills", type=int, default=None,
                    help="fail a kernel that spills more than this many bytes (default: spills are only reported)")
    ap.add_argument("--cache-dir", default=None, help="Triton cache folder (default: a fresh temporary one)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--list", action="store_true", help="print the distinct launches and compile nothing")
    ap.add_argument("--only", nargs="+", default=None, metavar="KERNEL",
                    help="compile only these kernels (names as in the table, e.g. _scale_kernel)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")

    sys.path.insert(0, REPO)
    with contextlib.ExitStack() as stack:
        cache_dir = args.cache_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="triton-compile-check-"))
        return _check(args, ap, cache_dir)


def _check(args: argparse.Namespace, ap: argparse.ArgumentParser, cache_dir: str) -> int:
    triton = _import_triton(cache_dir)
    start, cpu0 = time.perf_counter(), _cpu_seconds()
    launches = record_launches(args.full)
    missing = coverage_problems(launches)
    specs = distinct_specs(launches)
    if args.only:
        unknown = sorted(set(args.only) - {s.kernel for s in specs})
        if unknown:
            ap.error(f"--only: no launched kernel named {', '.join(unknown)}; the kernels are "
                     f"{', '.join(sorted({s.kernel for s in specs}))}")
        specs = [s for s in specs if s.kernel in args.only]
    if args.list:
        for spec in specs:
            print(f"{spec.module}.{spec.kernel}  {spec.config()}  [{spec.scenario}]")
        print(f"{len(specs)} distinct launches of {len({(s.module, s.kernel) for s in specs})} kernels")
        for p in missing:
            print("MISSING:", p)
        return 1 if missing else 0

    results = run_check(specs, args.targets, args.jobs, args.max_spills, cache_dir, args.full)
    print(format_table(results))
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"FAIL {r.kernel} [{r.config}] {r.target}: {r.why}\n     scenario: {r.scenario}")
    for p in missing:
        print("MISSING:", p)
    elapsed = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu0  # the workers' too: the pool has exited and been waited for
    print(f"triton {triton.__version__}: {len(results)} compiles ({len({r.kernel for r in results})} kernels, "
          f"{len(specs)} launches x {len(args.targets)} targets), {len(failed)} failed, {len(missing)} kernels "
          f"unchecked; {elapsed:.1f} s, {cpu:.1f} s of CPU, {args.jobs} job(s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "targets": {t: asdict(TARGETS[t]) for t in args.targets},
                       "seconds": elapsed, "cpu_seconds": cpu, "missing": missing,
                       "results": [asdict(r) for r in results]}, f, indent=1)
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
