"""How much an Omniglot test accuracy depends on which characters are in the test set.

The paper code's first release tested on 100 characters (its validation characters; a fix of
October 2017 swapped them back to the other 423), and its 423 come from a shuffle that depends on
the file system's listing order, so the paper's characters cannot be rebuilt. This measures the
spread instead: for a trained run, it draws ``--draws`` random subsets of ``--characters`` of the
run's test characters (each with its 4 rotations), evaluates each on 600 episodes fixed by the
config's ``eval_seed`` (queries in passes of the training's K per class, ``--queries-per-pass``),
and reports the standard deviation of the subset accuracies beside what the episodes' own noise
would give (the mean of the per-subset ``s / sqrt(n)``): the difference is the character draw.

    python bench/character_draw.py RUN_DIR --out FILE.json [--characters 100] [--draws 10]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402

from fastmaml.app import evaluate as ev  # noqa: E402
from fastmaml.app.run_setup import make_dataset, set_threads  # noqa: E402
from fastmaml.data.sampler import TaskSampler  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--characters", type=int, default=100)
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--data", default=os.environ.get("FASTMAML_DATA", "../shared/data"))
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if a.out.suffix != ".json":
        p.error(f"--out: expected a .json file, got {a.out}")
    set_threads(a.threads)
    ckpt, _, path = ev.load_run(str(a.run))
    config, learner = ev.restore_learner(ckpt, path, torch.device("cpu"))
    ds = make_dataset(config, "test", a.data, torch.device("cpu"), queries=config["eval_queries"],
                      seed=config["eval_seed"], can_set=False)
    chars = sorted({n.rsplit("/", 1)[0] for n in ds.class_names})
    if not 0 < a.characters <= len(chars):
        raise SystemExit(f"--characters: expected 1..{len(chars)}, got {a.characters}")
    g = np.random.default_rng(12345)
    rows = []
    for d in range(a.draws):
        pick = set(g.choice(chars, size=a.characters, replace=False).tolist())
        idx = [i for i, n in enumerate(ds.class_names) if n.rsplit("/", 1)[0] in pick]
        sub = TaskSampler(ds.images[idx], config["ways"], config["shots"], config["eval_queries"],
                          seed=config["eval_seed"], item_shape=ds.item_shape,
                          class_names=[ds.class_names[i] for i in idx], name=f"draw {d}")
        r = ev.evaluate(learner, config, sub, config["eval_episodes"], config["test_steps"],
                        config["eval_batch"], config["eval_seed"], queries_per_pass=config["queries"])
        rows.append({"draw": d, "accuracy": r["accuracy"], "accuracy_ci95": r["accuracy_ci95"]})
        print(f"draw {d}: {100 * r['accuracy']:.2f} ± {100 * r['accuracy_ci95']:.2f} %")
    accs = np.array([r["accuracy"] for r in rows])
    episode_sd = float(np.mean([r["accuracy_ci95"] / 1.96 for r in rows]))
    spread = float(accs.std(ddof=1))
    draw_sd = float(np.sqrt(max(spread ** 2 - episode_sd ** 2, 0.0)))
    out = {"what": f"{config['config']} at iteration {ckpt['iteration']}: accuracy on {a.draws} random "
                   f"subsets of {a.characters} of its {len(chars)} test characters, 600 episodes each, "
                   f"queries in passes of {config['queries']} per class",
           "machine": machine("cpu"), "command": "python bench/character_draw.py " + " ".join(argv or sys.argv[1:]),
           "draws": rows, "sd_of_subset_accuracies": spread, "sd_from_episodes_alone": episode_sd,
           "sd_from_the_character_draw": draw_sd}
    print(f"sd over draws {100 * spread:.2f} points; episodes alone {100 * episode_sd:.2f}; "
          f"the character draw {100 * draw_sd:.2f}")
    write_json(a.out.stem, out, str(a.out.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
