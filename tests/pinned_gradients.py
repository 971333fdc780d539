"""Pinned meta-gradients: a fixed set of configurations whose results every commit must reproduce
bit for bit (issue 23: the reorganization changes where code lives, never what it computes).

Each :data:`CASES` entry builds a model, a learner and a task batch from fixed seeds, runs one call
(``meta_step``, ``adapt`` or ``evaluate``) and returns every tensor that call produces or fills:
each parameter's ``.grad`` (and value, for Reptile's serial variant, which updates them), BatchNorm
buffers, the objective, the per-task losses and accuracy, the fast weights. The set covers every
engine path (fused: cpp, torch, triton; generic: vmap, loop; the reference oracle), both orders,
the four learning-rate modes, store / recompute / checkpointed memory, task chunks, running
BatchNorm statistics, and the algorithms (MAML, MAML++'s options, ANIL, Reptile, iMAML with each CG
backend), in float64 and float32.

``python tests/pinned_gradients.py --record`` writes ``tests/data/pinned_gradients.pt`` (run it only
when a change is *meant* to change results, and say so in the commit); ``tests/test_pinned_gradients.py``
compares. Everything runs on one CPU thread: a reduction split over threads rounds differently.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor, nn

PINNED_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "pinned_gradients.pt")
DTYPES = {"f64": torch.float64, "f32": torch.float32}


def _classes(T: int, ways: int, shots: int, queries: int, side: int, gen: torch.Generator,
             dtype: torch.dtype, flat: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """T few-shot tasks of ``ways`` classes: images [T, ways*shots, 1, side, side] (or flat) with a
    per-class mean, so that the tasks are learnable and the inputs far from uniform."""
    means = torch.randn(T, ways, 1, side, side, generator=gen, dtype=torch.float64)

    def draw(n: int) -> Tuple[Tensor, Tensor]:
        y = torch.arange(ways).repeat_interleave(n).expand(T, -1).contiguous()
        x = means[:, y[0]] + 0.7 * torch.randn(T, ways * n, 1, side, side, generator=gen, dtype=torch.float64)
        x = x.flatten(2) if flat else x
        return x.to(dtype), y

    sx, sy = draw(shots)
    qx, qy = draw(queries)
    return sx, sy, qx, qy


def _sines(T: int, n_support: int, n_query: int, gen: torch.Generator, dtype: torch.dtype):
    """T sinusoid regression tasks (amplitude 0.1-5, phase 0-pi, x in [-5, 5]): [T, N, 1] each."""
    amp = 0.1 + 4.9 * torch.rand(T, 1, 1, generator=gen, dtype=torch.float64)
    phase = torch.pi * torch.rand(T, 1, 1, generator=gen, dtype=torch.float64)

    def draw(n: int):
        x = -5 + 10 * torch.rand(T, n, 1, generator=gen, dtype=torch.float64)
        return x.to(dtype), (amp * torch.sin(x - phase)).to(dtype)

    sx, sy = draw(n_support)
    qx, qy = draw(n_query)
    return sx, sy, qx, qy


@dataclass(frozen=True)
class Case:
    name: str
    model: str                  # a kind of :func:`_model`
    algorithm: str = "maml"     # "maml", "anil", "reptile", "reptile_serial", "imaml"
    call: str = "meta_step"     # "meta_step", "adapt", "evaluate"
    options: Tuple[Tuple[str, object], ...] = ()

    def kwargs(self) -> Dict[str, object]:
        return dict(self.options)


def _model(kind: str, gen_seed: int) -> Tuple[nn.Module, str]:
    """The model and the kind of data it takes ("sine", "image", "flat")."""
    from fastmaml.models import Conv4, conv4, mlp, mlp_bn

    torch.manual_seed(gen_seed)
    if kind == "mlp":
        return mlp((40, 40)), "sine"
    if kind == "conv4_pool":
        return conv4(3, 6, image_size=16), "image"
    if kind == "conv4_stride":
        return conv4(3, 6, max_pool=False, image_size=16, init="paper"), "image"
    if kind == "conv4_psbn":
        return conv4(3, 6, image_size=16, per_step_bn=3), "image"
    if kind == "conv4_track":
        net = conv4(3, 6, image_size=16)
        for name, m in list(net.features.named_children()):
            if isinstance(m, nn.BatchNorm2d):
                net.features[int(name)] = nn.BatchNorm2d(m.num_features, momentum=0.3)
        return net, "image"
    if kind == "mlp_bn":
        return mlp_bn(3, hidden=(24, 12), in_features=64, init="paper"), "flat"
    # small ones for Triton, whose interpreter takes seconds per kernel launch on the CPU
    if kind == "conv2_pool":
        return Conv4(3, 4, image_size=8, blocks=2), "image8"
    if kind == "conv2_stride":
        return Conv4(3, 4, max_pool=False, image_size=8, blocks=2), "image8"
    if kind == "mlp_bn_small":
        return mlp_bn(3, hidden=(8,), in_features=16), "flat4"
    raise ValueError(kind)


def _batch(data: str, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    if data == "sine":
        return _sines(4, 5, 7, gen, dtype)
    if data == "image":
        return _classes(4, 3, 2, 2, 16, gen, dtype)
    if data == "image8":
        return _classes(2, 3, 1, 2, 8, gen, dtype)
    if data == "flat4":
        return _classes(2, 3, 2, 2, 4, gen, dtype, flat=True)
    return _classes(4, 3, 2, 3, 8, gen, dtype, flat=True)


def _learner(case: Case, model: nn.Module):
    import fastmaml

    kw = case.kwargs()
    if case.algorithm == "maml":
        return fastmaml.MAML(model, **kw)
    if case.algorithm == "anil":
        return fastmaml.ANIL(model, **kw)
    if case.algorithm == "reptile":
        return fastmaml.Reptile(model, **kw)
    if case.algorithm == "imaml":
        return fastmaml.IMAML(model, **kw)
    raise ValueError(case.algorithm)


def run_case(case: Case, dtype_name: str) -> Dict[str, Tensor]:
    """Every tensor that the case's call produces or fills, by name (CPU, detached)."""
    dtype = DTYPES[dtype_name]
    seed = sum(map(ord, case.name))  # fixed per case, independent of the case's position in CASES
    model, data = _model(case.model, seed)
    model = model.to(dtype)
    learner = _learner(case, model)
    sx, sy, qx, qy = _batch(data, dtype, seed + 1)
    out: Dict[str, Tensor] = {}
    if case.call == "meta_step":
        res = learner.meta_step(sx, sy, qx, qy)
        if res is not None and hasattr(res, "loss"):
            out["loss"] = res.loss
            out["task_losses"] = res.task_losses
            if res.task_accuracy is not None:
                out["task_accuracy"] = res.task_accuracy
        for name, p in learner.named_parameters():
            if p.grad is not None:
                out[f"grad:{name}"] = p.grad
        if case.algorithm == "reptile" and case.kwargs().get("variant") == "serial":
            for name, p in learner.named_parameters():
                out[f"param:{name}"] = p
    elif case.call == "adapt":
        fast = learner.adapt(sx, sy, steps=3)
        out["fast"] = fast.flat
        out["support_losses"] = fast.support_losses
        out["pred"] = learner.predict(fast, qx)
    elif case.call == "evaluate":
        res = learner.evaluate(sx, sy, qx, qy, steps=3)
        out["loss"] = res.loss
        out["task_losses"] = res.task_losses
        if res.task_accuracy is not None:
            out["task_accuracy"] = res.task_accuracy
    else:
        raise ValueError(case.call)
    for name, b in learner.named_buffers():
        out[f"buffer:{name}"] = b
    return {k: v.detach().clone().cpu() for k, v in out.items()}


def _cases() -> List[Case]:
    c: List[Case] = []
    fused = (("batching", "fused"),)
    # every engine path, on the sinusoid MLP and the two conv nets
    for model in ("mlp", "conv4_pool", "conv4_stride", "mlp_bn"):
        c.append(Case(f"{model}/reference", model, options=(("backend", "reference"), ("inner_steps", 2))))
        for kernels in ("cpp", "torch"):
            c.append(Case(f"{model}/fused-{kernels}", model,
                          options=fused + (("kernels", kernels), ("inner_steps", 2))))
        for batching in ("vmap", "loop"):
            c.append(Case(f"{model}/{batching}", model,
                          options=(("batching", batching), ("kernels", "cpp"), ("inner_steps", 2))))
        c.append(Case(f"{model}/auto", model, options=(("inner_steps", 2),)))
    for model in ("mlp", "conv2_pool", "conv2_stride", "mlp_bn_small"):
        c.append(Case(f"{model}/fused-triton", model, options=fused + (("kernels", "triton"), ("inner_steps", 2))))
    c.append(Case("conv2_pool/fused-cpp", "conv2_pool", options=fused + (("kernels", "cpp"), ("inner_steps", 2))))
    # meta-step options on the fused C++ path (and one on each generic path)
    base = fused + (("kernels", "cpp"),)
    c += [
        Case("conv4_pool/first_order", "conv4_pool", options=base + (("inner_steps", 3), ("first_order", True))),
        Case("conv4_pool/meta_sgd", "conv4_pool",
             options=base + (("inner_steps", 2), ("learn_lr", True), ("lr_mode", "per_parameter"))),
        Case("conv4_psbn/mamlpp", "conv4_psbn",
             options=base + (("inner_steps", 3), ("learn_lr", True), ("lr_mode", "per_layer_per_step"),
                             ("inner_lr", (0.3, 0.2, 0.1)), ("multi_step_weights", (0.2, 0.3, 0.5)))),
        Case("conv4_psbn/mamlpp-vmap", "conv4_psbn",
             options=(("batching", "vmap"), ("inner_steps", 3), ("learn_lr", True), ("lr_mode", "per_step"),
                      ("inner_lr", (0.3, 0.2, 0.1)), ("multi_step_weights", (0.2, 0.3, 0.5)))),
        Case("conv4_stride/recompute", "conv4_stride", options=base + (("inner_steps", 4), ("memory", "recompute"))),
        Case("conv4_stride/store0", "conv4_stride", options=base + (("inner_steps", 4), ("store_budget", 0))),
        Case("conv4_stride/chunk", "conv4_stride", options=base + (("inner_steps", 2), ("task_chunk", 3))),
        Case("conv4_pool/adapt_bn", "conv4_pool",
             options=base + (("inner_steps", 2), ("adapt_bn", True), ("learn_lr", True))),
        Case("conv4_track/running", "conv4_track", options=base + (("inner_steps", 2), ("bn_stats", "running"))),
        Case("conv4_track/running-loop", "conv4_track",
             options=(("batching", "loop"), ("inner_steps", 2), ("bn_stats", "running"))),
        Case("mlp/subset", "mlp", options=base + (("inner_steps", 2), ("adapt", ("4.weight", "4.bias")))),
        Case("mlp/recompute-vmap", "mlp",
             options=(("batching", "vmap"), ("inner_steps", 5), ("memory", "recompute"), ("inner_lr", 0.02))),
        Case("conv4_pool/adapt", "conv4_pool", call="adapt", options=base + (("inner_lr", 0.3),)),
        Case("mlp_bn/evaluate", "mlp_bn", call="evaluate", options=base + (("inner_lr", 0.3),)),
        Case("conv4_pool/evaluate-reference", "conv4_pool", call="evaluate", options=(("backend", "reference"),)),
    ]
    # the rest of the family
    c += [
        Case("conv4_pool/anil", "conv4_pool", "anil", options=(("inner_steps", 2), ("kernels", "cpp"))),
        Case("conv4_pool/anil-vmap", "conv4_pool", "anil", options=(("inner_steps", 2), ("batching", "vmap"))),
        Case("mlp/reptile", "mlp", "reptile", options=(("inner_steps", 3), ("kernels", "cpp"))),
        Case("conv4_pool/reptile-minibatch", "conv4_pool", "reptile",
             options=(("inner_steps", 3), ("inner_batch", 4), ("inner_data", "all"), ("kernels", "cpp"))),
        Case("mlp/reptile_serial", "mlp", "reptile",
             options=(("inner_steps", 3), ("variant", "serial"), ("outer_lr", 0.5), ("kernels", "cpp"))),
    ]
    for cg in ("torch", "cpp", "triton"):
        c.append(Case(f"mlp/imaml-cg_{cg}", "mlp", "imaml",
                      options=(("inner_steps", 3), ("kernels", "cpp"), ("cg_kernels", cg))))
    c.append(Case("conv4_pool/imaml", "conv4_pool", "imaml", options=(("inner_steps", 2), ("kernels", "cpp"))))
    # added after the first recording, recorded with the code of that commit (188a471): iMAML's outer
    # gradient on the generic runners
    c.append(Case("mlp/imaml-vmap", "mlp", "imaml", options=(("inner_steps", 3), ("batching", "vmap"))))
    c.append(Case("conv4_pool/imaml-loop", "conv4_pool", "imaml", options=(("inner_steps", 2), ("batching", "loop"))))
    return c


CASES: List[Case] = _cases()


def machine() -> Dict[str, str]:
    """What bitwise reproduction depends on beyond the code: the CPU's vector ISA and torch."""
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__.split("+")[0],
            "machine": platform.machine()}


def record_all() -> Dict[str, object]:
    torch.set_num_threads(1)
    results: Dict[str, Dict[str, Tensor]] = {}
    for case in CASES:
        for dt in DTYPES:
            results[f"{case.name}:{dt}"] = run_case(case, dt)
    return {"machine": machine(), "results": results}


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/pinned_gradients.py --record   (rewrites " + PINNED_FILE + ")")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    data = record_all()
    os.makedirs(os.path.dirname(PINNED_FILE), exist_ok=True)
    tmp = PINNED_FILE + ".tmp"
    torch.save(data, tmp)
    os.replace(tmp, PINNED_FILE)
    n = sum(len(v) for v in data["results"].values())
    print(f"wrote {len(data['results'])} results ({n} tensors) to {PINNED_FILE}")
