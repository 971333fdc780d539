"""Data-parallel meta-training on torch.distributed (issue 12), CPU and gloo.

* W = 2 processes x T/2 tasks + ``all_reduce_grads`` give the meta-gradient of 1 process x T tasks
  (float64, 1e-12), also for an uneven split, task chunks, learned rates and first order; the
  parameter checksum catches a drift of 1e-12 on one rank;
* ``fastmaml train sinusoid-tiny --nproc 2``: the same parameters as 1 process after 20 steps
  (float32, 1e-5 relative); rank 0 alone writes; the checkpoint holds the world size;
* a rank killed mid-run ends the job non-zero within the timeout, and the run folder resumes: in 2
  processes bitwise where the uninterrupted run ended, in 1 process with a warning that the world
  size differs; a hung rank ends the job after --dist-timeout;
  SIGTERM stops every rank after the same iteration, with a checkpoint; parameters that drift
  apart end the run with an error.

This file is also the workers' script: ``python test_distributed.py worker RANK WORLD PORT OUT``.
"""

import copy
import json
import os
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import fastmaml  # noqa: E402
from fastmaml.app import cli  # noqa: E402
from fastmaml.distributed import all_reduce_grads, task_slice  # noqa: E402

from helpers import classification_batch, conv_bn, mlp, regression_batch, rel_err  # noqa: E402

CASES = {
    "mlp_learn_lslr_T8": dict(kind="mlp", T=8, kw=dict(inner_lr=0.05, inner_steps=2, learn_lr=True,
                                                       lr_mode="per_layer_per_step")),
    "conv_bn_fused_T7_chunk2": dict(kind="conv", T=7, kw=dict(inner_lr=0.1, inner_steps=2, task_chunk=2)),
    "mlp_first_order_multi_step_T6": dict(kind="mlp", T=6, kw=dict(inner_lr=0.05, inner_steps=3, first_order=True,
                                                                   multi_step_weights=[0.2, 0.3, 0.5],
                                                                   learn_lr=True, lr_mode="per_step")),
}


def case(name):
    c = CASES[name]
    torch.manual_seed(0)
    if c["kind"] == "mlp":
        model, batch = mlp().double(), regression_batch(c["T"], seed=1)
    else:
        model, batch = conv_bn().double(), classification_batch(c["T"], seed=2)
    return fastmaml.MAML(copy.deepcopy(model), **c["kw"]), batch


def grads(learner):
    return [p.grad.clone() for p in learner.parameters() if p.requires_grad]


def worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    result = {}
    for name in CASES:
        learner, batch = case(name)
        T = batch[0].shape[0]
        s = task_slice(T, rank, world)
        learner.meta_step(*(t[s] for t in batch))
        all_reduce_grads(learner, weight=(s.stop - s.start) / T)
        result[name] = grads(learner)
    # the parameter checksum: equal parameters pass, a drifted rank fails on every rank
    from fastmaml.distributed import ParameterDrift, check_in_sync

    learner, _ = case("mlp_learn_lslr_T8")
    check_in_sync(learner)
    if rank == 1:
        with torch.no_grad():
            next(learner.parameters())[0].view(-1)[0] += 1e-12
    try:
        check_in_sync(learner, "in the test")
        result["drift"] = ""
    except ParameterDrift as e:
        result["drift"] = str(e)
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
                OMP_NUM_THREADS="1")


def test_task_slice():
    assert [task_slice(7, r, 2) for r in range(2)] == [slice(0, 4), slice(4, 7)]
    assert [task_slice(8, r, 4) for r in range(4)] == [slice(2 * r, 2 * r + 2) for r in range(4)]
    with pytest.raises(ValueError, match="meta_batch >= world size"):
        task_slice(3, 0, 4)


def test_nproc_checks_before_starting_anything(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "sinusoid-tiny", "--out", str(out), "--nproc", "26"]) == 2
    assert "meta_batch=25 tasks cannot be shared by 26 processes" in capsys.readouterr().err
    assert cli.main(["train", "sinusoid-tiny", "--out", str(out), "--nproc", "0"]) == 2
    assert "--nproc 0: expected a positive int" in capsys.readouterr().err
    assert cli.main(["train", "reptile-sinusoid", "--out", str(out), "--nproc", "2"]) == 2
    assert "serial Reptile adapts the tasks of a meta-batch in turn" in capsys.readouterr().err
    assert not out.exists()


def test_two_processes_give_the_one_process_meta_gradient(tmp_path):
    from fastmaml.app.distributed_train import _free_port

    out = str(tmp_path / "grads.pt")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "worker", str(r), "2", str(port), out], env=_env())
             for r in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    got = torch.load(out)
    assert got.pop("drift").startswith("the ranks' parameters differ in the test")
    for name in CASES:
        learner, batch = case(name)
        learner.meta_step(*batch)
        err = rel_err(got[name], grads(learner))
        assert err <= 1e-12, (name, err)


def test_all_reduce_grads_without_a_process_group_only_scales():
    learner, batch = case("mlp_learn_lslr_T8")
    learner.meta_step(*batch)
    before = grads(learner)
    extras = all_reduce_grads(learner, weight=0.5, extras=torch.tensor([3.0, 4.0]))
    assert rel_err(grads(learner), [0.5 * g for g in before]) <= 1e-15
    assert extras.tolist() == [3.0, 4.0]


def train(args, env=None, timeout=300):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "fastmaml", "train", *args], env=env or _env(), capture_output=True,
                       text=True, timeout=timeout)
    return r, time.monotonic() - t0


def params(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)


def _in_process(argv, capsys=None):
    threads = torch.get_num_threads()
    try:
        return cli.main(argv)
    finally:
        torch.set_num_threads(threads)


def test_two_processes_validate_in_the_training_passes(tmp_path):
    """Distributed validation (each rank a share of the episode batches) sends the queries ``queries``
    per class at a time, as 1 process does: the validation line of a 2-process omniglot-tiny run equals
    ``fastmaml eval --split val`` of its checkpoint in 1 process, which differs from one pass."""
    if not os.environ.get("FASTMAML_DATA"):
        pytest.skip("FASTMAML_DATA is unset: set it to the folder holding omniglot/ (e.g. /work/shared/data)")
    run = str(tmp_path / "two")
    r, _ = train(["omniglot-tiny", "--out", run, "--nproc", "2", "--quiet", "--threads", "1", "--set",
                  "iterations=2", "val_every=2", "checkpoint_every=2", "log_every=2", "val_episodes=8",
                  "eval_queries=6", "eval_batch=4"])
    assert r.returncode == 0, r.stderr
    val = [json.loads(s) for s in open(os.path.join(run, "metrics.jsonl"))][-1]
    assert (val["split"], val["episodes"]) == ("val", 8)
    evals = {}
    for name, extra in (("default", []), ("all", ["--queries-per-pass", "all"])):
        assert _in_process(["eval", run, "--split", "val", "--episodes", "8", "--batch", "4", "--threads", "1",
                            "--quiet", *extra]) == 0
        with open(os.path.join(run, "eval.json")) as f:
            evals[name] = json.load(f)
    assert evals["default"]["queries_per_pass"] == 3
    assert (val["accuracy"], val["loss"]) == (evals["default"]["accuracy"], evals["default"]["loss"])
    assert val["loss"] != evals["all"]["loss"]


def test_two_processes_train_like_one_and_a_killed_run_resumes_exactly(tmp_path, capsys):
    common = ["--quiet", "--threads", "1", "--set", "iterations=20", "val_every=10", "checkpoint_every=10"]
    one, two, killed = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "killed")
    assert _in_process(["train", "sinusoid-tiny", "--out", one, *common]) == 0
    r, _ = train(["sinusoid-tiny", "--out", two, "--nproc", "2", *common])
    assert r.returncode == 0, r.stderr
    a, b = params(one), params(two)
    assert a["world_size"] == 1 and b["world_size"] == 2 and b["iteration"] == 20
    for k in a["model"]:
        x, y = a["model"][k], b["model"][k]
        assert float((x - y).norm()) <= 1e-5 * max(float(x.norm()), 1e-12), k
    # rank 0 alone wrote: one metrics line per log/val point, the same numbers as 1 process
    m1 = [json.loads(s) for s in open(os.path.join(one, "metrics.jsonl"))]
    m2 = [json.loads(s) for s in open(os.path.join(two, "metrics.jsonl"))]
    assert [(m["split"], m["iter"]) for m in m1] == [(m["split"], m["iter"]) for m in m2]
    for x, y in zip(m1, m2):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (x, y)
    assert r.stdout.count("trained sinusoid-tiny") == 1

    # kill rank 1 at iteration 15: the job ends non-zero at once, the checkpoint of iteration 10 stays
    r, took = train(["sinusoid-tiny", "--out", killed, "--nproc", "2", "--dist-timeout", "20", *common],
                    env=dict(_env(), FASTMAML_FAULT="1:15:kill"))
    assert r.returncode != 0
    assert "rank 1 of 2 was killed by SIGKILL" in r.stderr, r.stderr
    assert took < 120, took
    state = params(killed)
    assert state["iteration"] == 10 and state["world_size"] == 2
    # resumed in 2 processes, it ends bitwise where the uninterrupted run did
    r, _ = train(["sinusoid-tiny", "--out", killed, "--nproc", "2", "--resume", *common])
    assert r.returncode == 0, r.stderr
    c = params(killed)
    assert c["iteration"] == 20 and all(torch.equal(b["model"][k], c["model"][k]) for k in b["model"])

    # resumed in another world size: it goes on, and says that the run is no longer bitwise reproducible
    capsys.readouterr()
    assert _in_process(["train", "sinusoid-tiny", "--out", two, "--resume", *common[:-3], "iterations=22",
                        "val_every=10", "checkpoint_every=10"]) == 0
    assert "written by a run of 2 process(es), this run has 1" in capsys.readouterr().err
    assert params(two)["iteration"] == 22


def test_hung_rank_ends_the_job_after_the_timeout(tmp_path):
    run = str(tmp_path / "run")
    r, took = train(["sinusoid-tiny", "--out", run, "--quiet", "--threads", "1", "--nproc", "2", "--dist-timeout",
                     "10", "--set", "iterations=30", "val_every=0"], env=dict(_env(), FASTMAML_FAULT="1:3:hang"))
    assert r.returncode != 0
    assert "rank 0/2: the all-reduce of iteration 3 failed" in r.stderr, r.stderr
    assert "--dist-timeout 10s" in r.stderr
    assert took < 90, took


def test_parameter_drift_fails_loudly(tmp_path):
    r, _ = train(["sinusoid-tiny", "--out", str(tmp_path / "run"), "--quiet", "--threads", "1", "--nproc", "2",
                  "--set", "iterations=30", "val_every=0"], env=dict(_env(), FASTMAML_FAULT="1:1:drift"))
    assert r.returncode == 1
    assert "the ranks' parameters differ after the all-reduce of iteration 1" in r.stderr, r.stderr


def test_sigterm_stops_every_rank_after_the_same_iteration(tmp_path):
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "fastmaml", "train", "sinusoid-tiny", "--out", str(run), "--quiet",
                          "--threads", "1", "--nproc", "2", "--set", "iterations=100000", "val_every=0", "log_every=5",
                          "checkpoint_every=100000"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.monotonic() < deadline:
        time.sleep(0.2)
    p.send_signal(15)  # to the launcher: it passes SIGTERM on to the ranks
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert err.count("stopped at iteration") == 1 and "error" not in err, err
    state = params(str(run))
    assert state["world_size"] == 2 and 5 <= state["iteration"] < 100000
    assert f"stopped at iteration {state['iteration']}/" in err


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
