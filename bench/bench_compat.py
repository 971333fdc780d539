"""The four published MAML examples: original library vs fastmaml's import swap vs the batched port.

Run in the benchmark venv (learn2learn 0.2.0, higher 0.2.1, TorchOpt; bench/setup_bench_env.sh):

    . .venv-bench/bin/activate && python bench/bench_compat.py [--tasks 8] [--repeats 3]

For each example's workload (examples/): the meta-step of the original per-task script on its library,
the same script with fastmaml.compat swapped in, and the batched port
(fastmaml.MAML.adapt(create_graph=True) + learner(fast, x)), one run, side by side:

* gradient check: float64 meta-gradients on one batch (2 tasks), whole-gradient relative error of the
  swap and of the port against the original library;
* speed: median seconds per meta-step (float32) over ``--repeats`` after one warm-up (a cheap meta-step is
  repeated to last 0.3 s per sample), on random inputs
  of the workload's shapes (speed does not depend on the pixels), per task and as a ratio to the original;
  every version with the same ``--threads`` (default 1: on a small shared CPU, more threads than free
  cores slow the batched kernels down tenfold and make the numbers meaningless).

The workloads keep their published shapes except the number of tasks per meta-step (``--tasks``,
default 8 instead of 32: the machines these run on are small). A table on stdout and JSON in
bench/results/compat_<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
sys.path.insert(0, os.path.join(HERE, ".."))

import fastmaml  # noqa: E402
from common import machine, median_time, table, write_json  # noqa: E402
from fastmaml.compat import higher as fhigher  # noqa: E402
from fastmaml.compat import learn2learn as fl2l  # noqa: E402
from fastmaml.compat import torchopt as ftorchopt  # noqa: E402
from fastmaml.models import Conv4  # noqa: E402
from higher_maml_omniglot import higher_net  # noqa: E402
from maml_sine import sine_model  # noqa: E402


def libraries():
    libs, why = {}, {}
    try:
        from baselines import import_learn2learn
        libs["learn2learn"] = import_learn2learn()
    except Exception as e:  # noqa: BLE001
        why["learn2learn"] = f"{type(e).__name__}: {e}"
    for name in ("higher", "torchopt"):
        try:
            libs[name] = __import__(name)
        except Exception as e:  # noqa: BLE001
            why[name] = f"{type(e).__name__}: {e}"
    return libs, why


# -- the per-task scripts (as published, the library passed in) -------------------------------------
def l2l_step(MAML, model, lr, steps, loss, batch, **kw):
    maml = MAML(model, lr=lr, **kw)
    sx, sy, qx, qy = batch
    total = 0.0
    for t in range(sx.shape[0]):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(loss(learner(sx[t]), sy[t]))
        total = total + loss(learner(qx[t]), qy[t])
    (total / sx.shape[0]).backward()


def higher_step(lib, net, lr, steps, loss, batch):
    sx, sy, qx, qy = batch
    inner_opt = torch.optim.SGD(net.parameters(), lr=lr)
    for t in range(sx.shape[0]):
        with lib.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(steps):
                diffopt.step(loss(fnet(sx[t]), sy[t]))
            loss(fnet(qx[t]), qy[t]).backward()


def torchopt_step(torchopt, net, lr, steps, loss, batch):
    sx, sy, qx, qy = batch
    inner_opt = torchopt.MetaSGD(net, lr=lr)
    net_state = torchopt.extract_state_dict(net)
    opt_state = torchopt.extract_state_dict(inner_opt)
    losses = []
    for t in range(sx.shape[0]):
        for _ in range(steps):
            inner_opt.step(loss(net(sx[t]), sy[t]))
        losses.append(loss(net(qx[t]), qy[t]))
        torchopt.recover_state_dict(net, net_state)
        torchopt.recover_state_dict(inner_opt, opt_state)
    torch.mean(torch.stack(losses)).backward()


def batched_step(learner, steps, batch, reduce):
    sx, sy, qx, qy = batch
    T = sx.shape[0]
    fast = learner.adapt(sx, sy, steps=steps, create_graph=True)
    out = learner(fast, qx)
    if qy.is_floating_point():
        per_task = (out - qy).pow(2).flatten(1).mean(1)
    else:
        per_task = F.cross_entropy(out.flatten(0, 1), qy.flatten(), reduction="none").view(T, -1).mean(1)
    (per_task.sum() if reduce == "sum" else per_task.mean()).backward()


# -- workloads -----------------------------------------------------------------------------------
def sine_batch(T, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(T, 20, 1, generator=g, dtype=dtype) * 10 - 5
    amp = torch.rand(T, 1, 1, generator=g, dtype=dtype) * 4.9 + 0.1
    ph = torch.rand(T, 1, 1, generator=g, dtype=dtype) * 3.14
    y = amp * torch.sin(x - ph)
    return x[:, :10], y[:, :10], x[:, 10:], y[:, 10:]


def omniglot_batch(T, ways, shots, queries, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = (torch.rand(T, ways * shots, 1, 28, 28, generator=g) > 0.8).to(dtype)
    qx = (torch.rand(T, ways * queries, 1, 28, 28, generator=g) > 0.8).to(dtype)
    sy = torch.arange(ways).repeat_interleave(shots).expand(T, -1).contiguous()
    qy = torch.arange(ways).repeat_interleave(queries).expand(T, -1).contiguous()
    return sx, sy, qx, qy


WORKLOADS = {
    # name: (library, make model, inner lr, steps, loss, batch(T, dtype), batched objective, adapt_bn)
    "learn2learn maml_sine.py": ("learn2learn", lambda: sine_model(40), 0.01, 5, F.mse_loss,
                                 lambda T, d: sine_batch(T, d), "mean"),
    "learn2learn vision/maml_omniglot.py": ("learn2learn", lambda: Conv4(5, 64, max_pool=False), 0.5, 1,
                                            F.cross_entropy, lambda T, d: omniglot_batch(T, 5, 1, 1, d), "mean"),
    "higher maml-omniglot.py": ("higher", lambda: higher_net(5, 64), 0.1, 5, F.cross_entropy,
                                lambda T, d: omniglot_batch(T, 5, 5, 15, d), "sum"),
    # the bookkeeping alone: the learn2learn and higher Omniglot nets at 4 channels on one 28x28 image
    # per task, where clone / adapt / the patched call cost more than the arithmetic
    "bookkeeping: learn2learn net, tiny": ("learn2learn", lambda: Conv4(5, 4, max_pool=False), 0.5, 1,
                                           F.cross_entropy, lambda T, d: omniglot_batch(T, 1, 1, 1, d), "mean"),
    "bookkeeping: higher net, tiny": ("higher", lambda: higher_net(5, 4), 0.1, 5, F.cross_entropy,
                                      lambda T, d: omniglot_batch(T, 1, 1, 1, d), "sum"),
    "TorchOpt few-shot/maml_omniglot.py": ("torchopt", lambda: higher_net(5, 64), 0.1, 5, F.cross_entropy,
                                           lambda T, d: omniglot_batch(T, 5, 5, 15, d), "mean"),
}


def runners(lib_name, libs, lr, steps, loss, reduce):
    """name -> fn(model, batch) that leaves the meta-gradient in the model's .grad."""
    out = {}
    if lib_name == "learn2learn":
        if "learn2learn" in libs:
            out["original"] = lambda m, b: l2l_step(libs["learn2learn"].algorithms.MAML, m, lr, steps, loss, b)
        out["import swap"] = lambda m, b: l2l_step(fl2l.algorithms.MAML, m, lr, steps, loss, b)
    elif lib_name == "higher":
        if "higher" in libs:
            out["original"] = lambda m, b: higher_step(libs["higher"], m, lr, steps, loss, b)
        out["import swap"] = lambda m, b: higher_step(fhigher, m, lr, steps, loss, b)
    else:
        if "torchopt" in libs:
            out["original"] = lambda m, b: torchopt_step(libs["torchopt"], m, lr, steps, loss, b)
        out["import swap"] = lambda m, b: torchopt_step(ftorchopt, m, lr, steps, loss, b)

    learners = {}

    def batched(m, b):
        if id(m) not in learners:  # the learner is made once, as a training script does
            learners[id(m)] = fastmaml.MAML(m, inner_lr=lr, inner_steps=steps, adapt_bn=True)
        batched_step(learners[id(m)], steps, b, reduce)
    out["batched port"] = batched
    return out


def rel(a, b):
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b)) ** 0.5
    return num / max(sum(float(y.pow(2).sum()) for y in b) ** 0.5, 1e-300)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default="", help="run the workloads whose name contains this")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for every version (default 1: stable on a small shared CPU)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    libs, why = libraries()
    rows = []
    for name, (lib_name, make, lr, steps, loss, batch_of, reduce) in WORKLOADS.items():
        if a.only and a.only not in name:
            continue
        run = runners(lib_name, libs, lr, steps, loss, reduce)
        # gradient check, float64, 2 tasks
        base = make().double()
        b64 = batch_of(2, torch.float64)
        grads = {}
        for k, fn in run.items():
            m = copy.deepcopy(base)
            fn(m, b64)
            grads[k] = [p.grad for p in m.parameters()]
        ref_key = "original" if "original" in grads else None
        # speed, float32
        b32 = batch_of(a.tasks, torch.float32)
        times = {}
        for k, fn in run.items():
            m = copy.deepcopy(base).float()

            def once(fn=fn, m=m):
                m.zero_grad(set_to_none=True)
                fn(m, b32)
            times[k] = median_time(once, "cpu", repeats=a.repeats, warmup=1, min_time=0.3)["median_s"]
        for k in run:
            rows.append({
                "example": name, "version": k,
                "s/meta-step": times[k], "ms/task": 1e3 * times[k] / a.tasks,
                "speed-up": (times["original"] / times[k]) if ref_key else None,
                "grad rel err": rel(grads[k], grads[ref_key]) if ref_key and k != ref_key else None,
            })
        if not ref_key:
            rows.append({"example": name, "version": f"original: not importable ({why.get(lib_name)})"})
        print(table([r for r in rows if r["example"] == name],
                    ["example", "version", "s/meta-step", "ms/task", "speed-up", "grad rel err"]), flush=True)
    info = machine("cpu")
    info["note"] = ("a noisy shared CPU (2 cores shared with other jobs): ratios from one run, medians of "
                    f"{a.repeats} repeats, {a.threads} torch thread(s)")
    versions = {}
    for n, mod in libs.items():
        versions[n] = getattr(mod, "__version__", "?")
    name = "compat_cpu" if not a.only else "compat_cpu_" + "".join(c if c.isalnum() else "_" for c in a.only)
    path = write_json(name, {"machine": info, "tasks": a.tasks, "repeats": a.repeats, "threads": a.threads,
                                     "libraries": versions, "missing": why, "rows": rows})
    print("\n" + table(rows, ["example", "version", "s/meta-step", "ms/task", "speed-up", "grad rel err"]))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
