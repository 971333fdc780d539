"""Check that the comparison baselines compute the same meta-gradient, and time them.

Run inside the bench venv (needs only torch + learn2learn/higher/torchopt +
bench/models.py + bench/baselines.py)::

    .venv-bench/bin/python bench/check_baselines.py            # agreement check
    .venv-bench/bin/python bench/check_baselines.py --time     # + standard-workload timings

Agreement check: float64, identical initial weights and data, tiny sizes
(conv4 5-way 1-shot 3 queries/class T=2; sinusoid MLP 5+5 points T=2;
K = 1 and 2; second and first order).  Every available baseline's meta-gradient
is compared with a literal per-task ``torch.autograd.grad(create_graph=True)``
loop written here, as the whole-gradient relative difference
||g_baseline - g_ref|| / ||g_ref|| over all parameters concatenated.  The
"SO-vs-FO" column gives the same distance between the second- and first-order
reference gradients, i.e. how large a difference the check would see if a
baseline silently dropped the second-order term.

Timing (--time): conv4, 5-way 1-shot, 15 queries/class, T=32, K=1 and 5,
float32, second order; median of --repeats timed steps after --warmup steps,
each (baseline, K) in its own subprocess, with its peak RSS.  On a shared
machine the numbers are only as good as the load allows: the load average
before/after each measurement is printed with it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
from torch.func import functional_call

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import baselines  # noqa: E402
from models import omniglot_conv4, sinusoid_mlp  # noqa: E402


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------
def classification_batch(tasks, ways, shots, queries, dtype, gen, in_channels=1, size=28):
    def labels(n):
        return torch.arange(ways).repeat_interleave(n).expand(tasks, -1).contiguous()

    sx = torch.randn(tasks, ways * shots, in_channels, size, size, generator=gen, dtype=dtype)
    qx = torch.randn(tasks, ways * queries, in_channels, size, size, generator=gen, dtype=dtype)
    return sx, labels(shots), qx, labels(queries)


def sinusoid_batch(tasks, n_support, n_query, dtype, gen):
    amp = torch.empty(tasks, 1, 1, dtype=dtype).uniform_(0.1, 5.0, generator=gen)
    phase = torch.empty(tasks, 1, 1, dtype=dtype).uniform_(0.0, torch.pi, generator=gen)

    def points(n):
        x = torch.empty(tasks, n, 1, dtype=dtype).uniform_(-5.0, 5.0, generator=gen)
        return x, amp * torch.sin(x - phase)

    sx, sy = points(n_support)
    qx, qy = points(n_query)
    return sx, sy, qx, qy


# ---------------------------------------------------------------------------
# reference: literal per-task autograd loop
# ---------------------------------------------------------------------------
def reference_meta_grad(model, inner_lr, inner_steps, first_order, sx, sy, qx, qy):
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    buffers = dict(model.named_buffers())

    def forward(weights, x):
        return functional_call(model, (dict(zip(names, weights)), buffers), (x,))

    n_tasks = sx.shape[0]
    acc = [torch.zeros_like(p) for p in params]
    total = torch.zeros((), dtype=params[0].dtype)
    for t in range(n_tasks):
        fast = list(params)
        for _ in range(inner_steps):
            inner = baselines.task_loss(forward(fast, sx[t]), sy[t])
            g = torch.autograd.grad(inner, fast, create_graph=not first_order)
            fast = [w - inner_lr * gi for w, gi in zip(fast, g)]
        outer = baselines.task_loss(forward(fast, qx[t]), qy[t]) / n_tasks
        for a, g in zip(acc, torch.autograd.grad(outer, params)):
            a.add_(g)
        total += outer.detach()
    return acc, total


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def rel(a, b):
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


# ---------------------------------------------------------------------------
# agreement check
# ---------------------------------------------------------------------------
def check(names, tol):
    torch.manual_seed(0)
    dtype = torch.float64
    gen = torch.Generator().manual_seed(1234)
    cases = [
        ("conv4 5w1s q3 T2", omniglot_conv4(5).to(dtype), 0.4,
         classification_batch(2, 5, 1, 3, dtype, gen)),
        ("sinusoid 5+5 T2", sinusoid_mlp().to(dtype), 0.01,
         sinusoid_batch(2, 5, 5, dtype, gen)),
    ]
    rows, bad, known_bad = [], [], []
    widths = [max(12, len(n)) + 2 for n in names]
    print(f"{'case':<18} {'K':>1} {'order':<5} {'SO-vs-FO':>9}  "
          + "".join(f"{n:>{w}}" for n, w in zip(names, widths)))
    for label, model0, lr, data in cases:
        model0.train()
        has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model0.modules())
        for k in (1, 2):
            ref = {}
            for fo in (False, True):
                g, loss = reference_meta_grad(model0, lr, k, fo, *data)
                ref[fo] = (flat(g), loss)
            so_fo = rel(ref[True][0], ref[False][0])
            for fo in (False, True):
                g_ref, loss_ref = ref[fo]
                cells = []
                for name in names:
                    model = copy.deepcopy(model0)
                    step = baselines.make(name, model, lr, k, fo)
                    loss = step(*data)
                    g = flat([p.grad for p in model.parameters()])
                    d = rel(g, g_ref)
                    dl = abs(float(loss) - float(loss_ref)) / abs(float(loss_ref))
                    # parameters must be left untouched
                    same = all(torch.equal(p, q) for p, q in zip(model.parameters(), model0.parameters()))
                    flag = "" if same else "!"
                    if max(d, dl) > tol:
                        known = name == "torch_func" and not fo and has_bn
                        flag += "k" if known else "*"
                        (known_bad if known else bad).append(f"{label} K={k} {'FO' if fo else 'SO'} {name}")
                    cells.append(f"{f'{d:.2e}' + flag:>{widths[len(cells)]}}")
                    rows.append(dict(case=label, K=k, first_order=fo, baseline=name,
                                     rel_grad_diff=d, rel_loss_diff=dl, params_unchanged=same))
                print(f"{label:<18} {k:>1} {'FO' if fo else 'SO':<5} {so_fo:9.2e}  " + "".join(cells))
    # the reference itself against central finite differences of the meta-loss
    label, model0, lr, data = cases[0]
    names_p = [n for n, _ in model0.named_parameters()]
    direction = [torch.randn(p.shape, generator=gen, dtype=dtype) for p in model0.parameters()]
    norm = torch.sqrt(sum((d * d).sum() for d in direction))
    direction = [d / norm for d in direction]  # unit direction: the FD step below is a length

    def meta_loss_at(eps):
        m = copy.deepcopy(model0)
        with torch.no_grad():
            for p, d in zip(m.parameters(), direction):
                p.add_(eps * d)
        return reference_meta_grad(m, lr, 1, False, *data)[1].item()

    g_ref, _ = reference_meta_grad(model0, lr, 1, False, *data)
    analytic = float(sum((g * d).sum() for g, d in zip(g_ref, direction)))
    h = 1e-6
    fd = (meta_loss_at(h) - meta_loss_at(-h)) / (2 * h)
    fd_rel = abs(fd - analytic) / abs(fd)
    print(f"directional derivative of the meta-loss ({label}, K=1, SO, random direction over "
          f"{len(names_p)} tensors): central finite difference {fd:.10g}")
    print(f"  {'reference':<18} {analytic:.10g}  (rel to FD {fd_rel:.1e})")
    ok_fd = fd_rel < 1e-6
    for name in names:
        model = copy.deepcopy(model0)
        baselines.make(name, model, lr, 1, False)(*data)
        dd = float(sum((p.grad * d).sum() for p, d in zip(model.parameters(), direction)))
        print(f"  {name:<18} {dd:.10g}  (rel to FD {abs(fd - dd) / abs(fd):.1e})")

    ok = ok_fd and not bad and all(r["params_unchanged"] for r in rows)
    good = [r for r in rows if max(r["rel_grad_diff"], r["rel_loss_diff"]) <= tol]
    print(f"cells: relative meta-gradient difference to the reference; "
          f"'*' = over tol {tol:g}, 'k' = over tol, known PyTorch vmap+BatchNorm "
          f"double-backward bug, '!' = baseline changed the parameters")
    print(f"max relative difference (grad and loss) of the agreeing cells = "
          f"{max((max(r['rel_grad_diff'], r['rel_loss_diff']) for r in good), default=0.0):.2e}")
    if known_bad:
        print(f"known-wrong (torch.func second order through BatchNorm under vmap): {len(known_bad)} cells")
    print("RESULT:", "OK" if ok else "MISMATCH: " + "; ".join(bad))
    return ok, rows


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------
def time_one(name, k, tasks, ways, shots, queries, warmup, repeats, first_order=False):
    """Time one baseline at one K in this process; returns a result dict."""
    import resource

    dtype = torch.float32
    gen = torch.Generator().manual_seed(0)
    data = classification_batch(tasks, ways, shots, queries, dtype, gen)
    torch.manual_seed(0)
    model = omniglot_conv4(ways).train()
    step = baselines.make(name, model, 0.4, k, first_order)
    for _ in range(warmup):
        step(*data)
    times, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        step(*data)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return dict(baseline=name, K=k, median_s=statistics.median(times), min_s=min(times),
                max_s=max(times), times_s=times, median_cpu_s=statistics.median(cpu),
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                load1_after=os.getloadavg()[0])


def time_baselines(names, ks, tasks, ways, shots, queries, warmup, repeats, first_order=False,
                   isolate=True, threads=None):
    """Each (baseline, K) in a fresh subprocess (clean peak RSS; a crash or OOM kill of one
    baseline does not lose the others) unless ``isolate`` is False."""
    import subprocess

    if threads:
        torch.set_num_threads(threads)
    print(f"conv4 {ways}-way {shots}-shot, {queries} queries/class, T={tasks}, float32, "
          f"{'first' if first_order else 'second'} order; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; warm-up {warmup}, median of {repeats}; "
          f"{'one process per baseline' if isolate else 'one process'}")
    results = []
    for k in ks:
        for name in names:
            load_before = os.getloadavg()[0]
            if isolate:
                cmd = [sys.executable, os.path.abspath(__file__), "--_time-one", name, str(k),
                       "--tasks", str(tasks), "--warmup", str(warmup), "--repeats", str(repeats)]
                if first_order:
                    cmd.append("--first-order")
                if threads:
                    cmd += ["--threads", str(threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                if proc.returncode != 0 or not lines:
                    why = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
                    print(f"  K={k}  {name:<17} FAILED ({why})", flush=True)
                    results.append(dict(baseline=name, K=k, error=why, returncode=proc.returncode))
                    continue
                r = json.loads(lines[-1])
            else:
                r = time_one(name, k, tasks, ways, shots, queries, warmup, repeats, first_order)
            r["load1_before"] = load_before
            results.append(r)
            print(f"  K={k}  {name:<17} median {r['median_s'] * 1e3:9.1f} ms/step  "
                  f"(min {r['min_s'] * 1e3:.1f}, max {r['max_s'] * 1e3:.1f}; "
                  f"process CPU {r['median_cpu_s'] * 1e3:.1f} ms; peak RSS {r['peak_rss_mib']:.0f} MiB; "
                  f"load1 {load_before:.1f}->{r['load1_after']:.1f})", flush=True)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baselines", default=",".join([*baselines.BASELINES, *baselines.VARIANTS]),
                    help="comma-separated subset (default: all baselines and variants)")
    ap.add_argument("--tol", type=float, default=1e-9, help="max allowed relative difference (float64)")
    ap.add_argument("--time", action="store_true", help="also time the standard workload")
    ap.add_argument("--only-time", action="store_true", help="skip the agreement check")
    ap.add_argument("--ks", default="1,5")
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--first-order", action="store_true", help="time first-order MAML instead")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch.set_num_threads for the timing (default: torch's default). On a "
                         "shared machine use 1: with more threads than free cores the OpenMP "
                         "barriers make steps 10-20x slower")
    ap.add_argument("--no-isolate", action="store_true", help="time all baselines in this process")
    ap.add_argument("--json", help="write the results to this JSON file")
    ap.add_argument("--_time-one", nargs=2, metavar=("NAME", "K"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._time_one:  # worker of time_baselines
        if args.threads:
            torch.set_num_threads(args.threads)
        name, k = args._time_one[0], int(args._time_one[1])
        r = time_one(name, k, args.tasks, 5, 1, 15, args.warmup, args.repeats, args.first_order)
        print(json.dumps(r))
        return 0

    avail = baselines.available()
    wanted = [n for n in args.baselines.split(",") if n]
    names = [n for n in wanted if avail.get(n) is True]
    print("versions:", baselines.versions())
    for n in wanted:
        print(f"  {n:<12} {'available' if avail.get(n) is True else 'UNAVAILABLE: ' + str(avail.get(n))}")

    out = {"versions": baselines.versions(), "available": {k: str(v) for k, v in avail.items()}}
    ok = True
    if not args.only_time:
        ok, out["check"] = check(names, args.tol)
    if args.time or args.only_time:
        ks = [int(k) for k in args.ks.split(",")]
        out["timing"] = time_baselines(names, ks, args.tasks, 5, 1, 15, args.warmup, args.repeats,
                                       args.first_order, isolate=not args.no_isolate,
                                       threads=args.threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
