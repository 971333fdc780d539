"""The built-in experiment configs (the MAML paper's settings) and typed ``--set key=value`` parsing.

A config is a flat ``dict`` of settings. Every key has a type, taken from the built-in value (bool,
int, float, str, or a list of ints), and most have bounds or choices; ``--set`` parses a string to
that type and checks it. ``docs/reproduction.md`` explains where the values come from.

Its mistakes raise :class:`~fastmaml.app.errors.UserError` (also reachable as ``configs.UserError``),
which the command line reports as a one-line ``fastmaml: error: ...`` with exit status 2.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import UserError  # also re-exported: `from fastmaml.configs import UserError` predates errors.py

Config = Dict[str, Any]


# -- keys --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    help: str
    min: Optional[float] = None          # inclusive lower bound (numbers; each element for lists)
    choices: Optional[Tuple[str, ...]] = None
    settable: bool = True                # False: fixed by the config (pick another config instead)
    resumable: bool = False              # True: may differ when resuming (does not change the run)
    absent: Any = None                   # the value of a run saved before the key existed (None: none)


KERNELS = ("auto", "torch", "cpp", "cuda", "triton")

KEYS: Dict[str, Key] = {
    # what is learned
    "dataset": Key("the task distribution", choices=("sinusoid", "omniglot", "miniimagenet"), settable=False),
    "model": Key("the network", choices=("mlp", "conv4", "mlp_bn"), settable=False),
    "ways": Key("classes per task (N-way)", min=2),
    "shots": Key("support examples per class (K-shot); support points for sinusoid", min=1),
    "queries": Key("query examples per class in training; query points for sinusoid", min=1),
    "eval_queries": Key("query examples per class (points for sinusoid) in validation and evaluation", min=1),
    "image_size": Key("images are resized to image_size x image_size", min=4),
    "rotations": Key("augment the classes with rotations by 90, 180, 270 degrees (Omniglot)"),
    "split_scheme": Key("Omniglot class split: vinyals (train/val/test), maml (1200 train / 423 test "
                        "characters, no validation split: needs val_every=0) or maml_val (the MAML code's: 1100 "
                        "train / 100 val / the same 423 test)", choices=("vinyals", "maml", "maml_val")),
    "resize": Key("Omniglot 105 -> image_size: lanczos (antialiased, then binarised) or nearest (the images "
                  "the MAML code trained on: PIL resizes its 1-bit PNGs by nearest neighbour)",
                  choices=("lanczos", "nearest"), absent="lanczos"),
    "task_rotations": Key("Omniglot training tasks: class (N distinct character-rotation classes: a task may hold one "
                          "character at two rotations) or character (the MAML code's: N distinct characters, each at "
                          "its own random rotation); validation always class, fastmaml eval: --task-rotations",
                          choices=("class", "character"), absent="class"),
    "task_pool": Key("Omniglot training tasks: 0 (a fresh task every time) or P (the MAML code's 200000: P tasks drawn "
                     "up front from the seed and cycled in order; with task_rotations=character the rotations are "
                     "drawn again each time)", min=0, absent=0),
    "download": Key("download the data set when it is missing (where the data layer can)", resumable=True),
    "hidden": Key("conv filters per layer (conv4) / hidden widths (mlp, a comma-separated list)", min=1),
    "init": Key("initialization: torch (PyTorch's defaults) or paper (the MAML code's: fully connected weights "
                "truncated N(0, 0.01^2); conv4: Xavier convolutions, an N(0, 1) head on Omniglot, Xavier on "
                "mini-ImageNet; zero biases, BatchNorm without scale, eps 1e-3)",
                choices=("torch", "paper"), absent="torch"),
    "max_pool": Key("conv4: 2x2 max-pooling after each block (paper text); false: stride-2 convolutions "
                    "and a global average pool (paper code)"),
    "conv_padding": Key("conv4's stride-2 convolutions (max_pool=false): symmetric (1 on every side) or tf (the "
                        "MAML code's TensorFlow SAME: an even side padded at the bottom and right only); the "
                        "stride-1 ones pad 1 on every side either way", choices=("symmetric", "tf"),
                        absent="symmetric"),
    # MAML
    "inner_lr": Key("inner-loop (adaptation) learning rate alpha", min=0.0),
    "inner_steps": Key("inner gradient steps in meta-training", min=1),
    "test_steps": Key("inner gradient steps at validation and evaluation", min=1),
    "first_order": Key("first-order MAML (drop the second derivatives)"),
    "learn_lr": Key("meta-learn the inner learning rate too (a scalar, Meta-SGD style)"),
    "memory": Key("meta-gradient memory mode", choices=("store", "recompute")),
    "kernels": Key("fused-op kernel backend", choices=KERNELS),
    "batching": Key("how the model runs on the tasks of a batch: auto (the fused path, the project's task-batched "
                    "layer kernels, when the model and loss allow it, as for every built-in config; else loop for "
                    "conv nets on the CPU and vmap otherwise), fused (an error when the model does not allow it), "
                    "vmap or loop (generic paths over autograd)", choices=("auto", "fused", "vmap", "loop")),
    "cuda_graph": Key("record the meta-step in a CUDA graph and replay it (needs --device cuda; same gradients, "
                      "less CPU launch overhead)"),
    # meta-optimization
    "meta_batch": Key("tasks per meta-update", min=1),
    "meta_lr": Key("Adam learning rate of the meta-update (beta)", min=0.0),
    "grad_clip": Key("clip every meta-gradient element to [-grad_clip, grad_clip]; 0 disables", min=0.0),
    "adam_epsilon": Key("where the meta-optimizer Adam adds its epsilon 1e-8: torch (to the bias-corrected "
                        "sqrt(v)) or tf (the MAML code's TensorFlow Adam: to sqrt(v) before the correction; "
                        "fastmaml.tf_adam)", choices=("torch", "tf"), absent="torch"),
    "iterations": Key("meta-training iterations (meta-updates)", min=1, resumable=True),
    "seed": Key("seed of the initialization, the task sampler and every RNG", min=0),
    # bookkeeping
    "log_every": Key("write a training line to metrics.jsonl every this many iterations and at the last one "
                     "(a run shorter than log_every: every tenth of it)", min=1),
    "val_every": Key("validate every this many iterations; 0 disables", min=0),
    "val_episodes": Key("validation episodes (fixed by val_seed)", min=1),
    "val_seed": Key("seed of the fixed validation episodes", min=0),
    "checkpoint_every": Key("write RUN_DIR/checkpoint.pt every this many iterations", min=1, resumable=True),
    "eval_episodes": Key("test episodes of `fastmaml eval` (fixed by eval_seed)", min=1, resumable=True),
    "eval_seed": Key("seed of the fixed test episodes", min=0, resumable=True),
    "eval_batch": Key("episodes evaluated together (memory and speed; results change only by rounding)",
                      min=1, resumable=True),
    # the rest of the MAML family (issue 14; fastmaml/algorithms/): only in the configs that use them
    "algorithm": Key("the meta-learning algorithm", choices=("maml", "anil", "reptile", "imaml", "mamlpp"),
                     settable=False),
    "meta_optimizer": Key("the outer optimizer (Reptile: sgd, so that meta_lr is its step size epsilon)",
                          choices=("adam", "sgd")),
    "meta_lr_schedule": Key("meta learning rate over the run: constant, cosine (MAML++) or linear (Reptile), "
                            "from meta_lr to min_meta_lr", choices=("constant", "cosine", "linear")),
    "min_meta_lr": Key("the meta learning rate at the end of a cosine or linear schedule", min=0.0),
    "lr_mode": Key("inner learning rates: scalar, per_step, per_layer_per_step (MAML++ LSLR), per_parameter",
                   choices=("scalar", "per_step", "per_layer_per_step", "per_parameter")),
    "first_order_iterations": Key("MAML++ derivative-order annealing: first order for the first N iterations", min=0),
    "msl_iterations": Key("MAML++ multi-step loss, annealed toward the last step, for the first N iterations "
                          "(0: off)", min=0),
    "per_step_bn": Key("MAML++ per-step BatchNorm weights (BNWB): each BatchNorm keeps one scale/shift set per "
                       "inner step, inner_steps sets (test steps beyond them use the last set)"),
    "reptile_variant": Key("Reptile: batched (Algorithm 2) or serial (Algorithm 1)", choices=("batched", "serial")),
    "inner_batch": Key("Reptile: examples per inner SGD step (0: the whole set)", min=0),
    "inner_data": Key("Reptile: the inner loop trains on the support set or on support and query (all)",
                      choices=("support", "all")),
    "imaml_lambda": Key("iMAML: the proximal regularization lambda (> 0)", min=0.0),
    "cg_steps": Key("iMAML: conjugate-gradient iterations (>= 1)", min=1),
}


# -- the built-in configs ----------------------------------------------------------------------------

_COMMON = {
    "seed": 0,
    "first_order": False,
    "learn_lr": False,
    "memory": "store",
    "kernels": "auto",
    "batching": "auto",
    "cuda_graph": False,
    "meta_lr": 1e-3,
    "adam_epsilon": "torch",
    "test_steps": 10,
    "grad_clip": 0.0,
    "log_every": 100,
    "checkpoint_every": 1000,
    "val_seed": 1,
    "eval_seed": 2,
    "eval_episodes": 600,
}

_SINUSOID = dict(
    _COMMON,
    dataset="sinusoid", model="mlp", hidden=[40, 40],
    shots=10, queries=10, eval_queries=100,
    inner_lr=0.01, inner_steps=1,
    meta_batch=25, iterations=70000,
    val_every=1000, val_episodes=100, eval_batch=100,
)

_OMNIGLOT = dict(
    _COMMON,
    dataset="omniglot", model="conv4", hidden=64, max_pool=True, init="torch", conv_padding="symmetric",
    ways=5, shots=1, queries=1, eval_queries=15,
    image_size=28, rotations=True, split_scheme="vinyals", resize="lanczos", task_rotations="class", task_pool=0,
    download=False,
    inner_lr=0.4, inner_steps=1,
    meta_batch=32, iterations=60000,
    val_every=1000, val_episodes=100, eval_batch=50,
)

_MINIIMAGENET = dict(
    _COMMON,
    dataset="miniimagenet", model="conv4", hidden=32, max_pool=True, init="torch", conv_padding="symmetric",
    ways=5, shots=1, queries=15, eval_queries=15,
    image_size=84,
    inner_lr=0.01, inner_steps=5,
    meta_batch=4, iterations=60000, grad_clip=10.0,
    val_every=1000, val_episodes=100, eval_batch=20,
)


def _build() -> Dict[str, Tuple[str, Config]]:
    out: Dict[str, Tuple[str, Config]] = {}
    out["sinusoid"] = ("10-shot sinusoid regression, MLP 1-40-40-1 (paper section 5.1)", dict(_SINUSOID))
    for ways, shots in ((5, 1), (5, 5), (20, 1), (20, 5)):
        twenty = ways == 20
        cfg = dict(_OMNIGLOT, ways=ways, shots=shots, queries=shots,
                   meta_batch=16 if twenty else 32,
                   inner_lr=0.1 if twenty else 0.4,
                   inner_steps=5 if twenty else 1)
        out[f"omniglot-{ways}w{shots}s"] = (f"Omniglot {ways}-way {shots}-shot, conv4 64 filters", cfg)
    for shots in (1, 5):
        cfg = dict(_MINIIMAGENET, shots=shots)
        out[f"miniimagenet-5w{shots}s"] = (f"mini-ImageNet 5-way {shots}-shot, conv4 32 filters", cfg)
    # The paper's "MAML, no conv" row (section 5.2): hidden 256-128-64-64, each Linear + BN + ReLU.
    for shots in (1, 5):
        cfg = {k: v for k, v in _OMNIGLOT.items() if k != "max_pool"}
        cfg.update(model="mlp_bn", hidden=[256, 128, 64, 64], init="paper", shots=shots, queries=shots)
        out[f"omniglot-mlp-5w{shots}s"] = (f"Omniglot 5-way {shots}-shot, no convolutions: MLP 256-128-64-64 "
                                           "with BatchNorm (paper section 5.2)", cfg)
    for name in list(out):
        desc, cfg = out[name]
        out[f"{name}-fo"] = (desc + ", first-order MAML", dict(cfg, first_order=True))
    # The rest of the MAML family (issue 14, docs/reproduction.md "Other algorithms").
    omni = {k: v for k, v in _OMNIGLOT.items()}
    out["anil-omniglot-5w1s"] = ("ANIL (Raghu et al. 2020): Omniglot 5-way 1-shot, conv4, only the head adapts",
                                 dict(omni, algorithm="anil"))
    out["reptile-sinusoid"] = ("Reptile (Nichol et al. 2018), its sinusoid demo: serial, 5 SGD steps of 10 points",
                               dict(_SINUSOID, algorithm="reptile", reptile_variant="serial", inner_batch=10,
                                    inner_data="all", shots=10, queries=40, inner_lr=0.02, inner_steps=5,
                                    test_steps=32, meta_batch=1, meta_optimizer="sgd", meta_lr=0.1,
                                    meta_lr_schedule="linear", min_meta_lr=0.0, iterations=30000))
    for shots in (1, 5):
        out[f"reptile-omniglot-5w{shots}s"] = (
            f"Reptile: Omniglot 5-way {shots}-shot, batched, SGD inner loop (the paper's uses Adam)",
            dict(omni, algorithm="reptile", reptile_variant="batched", inner_batch=10, inner_data="all",
                 shots=shots, queries=10 - shots if shots < 10 else 5, inner_lr=0.1, inner_steps=5,
                 test_steps=50, meta_batch=5, meta_optimizer="sgd", meta_lr=1.0, meta_lr_schedule="linear",
                 min_meta_lr=0.0, iterations=100000, max_pool=True))
    out["imaml-omniglot-5w1s"] = ("iMAML (Rajeswaran et al. 2019): Omniglot 5-way 1-shot, lambda 2, 16 proximal "
                                  "GD steps, 5 CG steps", dict(omni, algorithm="imaml", imaml_lambda=2.0,
                                                                cg_steps=5, inner_lr=0.1, inner_steps=16,
                                                                test_steps=16))
    for ways, shots in ((5, 1), (5, 5), (20, 1), (20, 5)):
        out[f"mamlpp-omniglot-{ways}w{shots}s"] = (
            f"MAML++ (Antoniou et al. 2019): Omniglot {ways}-way {shots}-shot: LSLR, multi-step loss, "
            "derivative-order and cosine annealing, per-step BatchNorm weights", dict(
                omni, algorithm="mamlpp", ways=ways, shots=shots, queries=shots, meta_batch=16, inner_lr=0.1,
                inner_steps=5, test_steps=5, learn_lr=True, lr_mode="per_layer_per_step",
                first_order_iterations=25000, msl_iterations=5000, meta_lr_schedule="cosine",
                min_meta_lr=1e-5, iterations=50000, val_every=500, per_step_bn=True))
    # Smoke configs (the README's first commands, and tests): short runs on a CPU that still show
    # learning. Their meta learning rate is 10x the paper's 1e-3: at 1e-3 a run this short barely
    # moves (sinusoid-tiny at 200 iterations went from 3.0 to 3.2). Measured with 1 thread
    # (tests/test_readme.py checks the fall): sinusoid-tiny's query MSE falls about 6x in 1,000
    # iterations (about 5 s of training on an idle core); omniglot-tiny's query loss about 3x (accuracy
    # 40% -> 80%) in 200.
    out["sinusoid-tiny"] = ("smoke run: the paper's sinusoid MLP, 1,000 iterations at meta_lr 0.01 (seconds)", dict(
        _SINUSOID, meta_lr=0.01, iterations=1000, log_every=20, val_every=100, val_episodes=25,
        checkpoint_every=100, eval_episodes=600))
    out["omniglot-tiny"] = ("smoke run: Omniglot 5-way 1-shot, conv4 with 16 filters, 200 iterations at meta_lr "
                            "0.01", dict(
        _OMNIGLOT, hidden=16, queries=3, eval_queries=5, meta_batch=8, meta_lr=0.01, iterations=200,
        test_steps=3, log_every=10, val_every=50, val_episodes=20, checkpoint_every=50, eval_episodes=100,
        eval_batch=20))
    for name, (_, cfg) in out.items():
        unknown = set(cfg) - set(KEYS)
        assert not unknown, (name, unknown)
    return out


CONFIGS: Dict[str, Tuple[str, Config]] = _build()


def names() -> List[str]:
    return list(CONFIGS)


def get(name: str) -> Config:
    """A fresh copy of built-in config ``name`` (with its name under ``"config"``)."""
    if name not in CONFIGS:
        raise UserError(f"unknown config {name!r}; valid configs: {', '.join(CONFIGS)}")
    cfg = copy.deepcopy(CONFIGS[name][1])
    out: Config = {"config": name}
    out.update((k, cfg[k]) for k in KEYS if k in cfg)  # in the order of KEYS
    return out


def describe(name: str) -> str:
    return CONFIGS[name][0]


# -- types and parsing -------------------------------------------------------------------------------

def type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "list of ints"
    raise TypeError(f"unsupported config value {value!r}")


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _parse_int(key: str, text: str) -> int:
    try:
        return int(text.strip().replace("_", ""), 10)
    except ValueError:
        raise UserError(f"--set {key}={text}: expected an int, e.g. {key}=10") from None


def parse_value(key: str, text: str, like: Any) -> Any:
    """``text`` parsed to the type of ``like`` (the config's current value for ``key``)."""
    kind = type_name(like)
    t = text.strip()
    if kind == "bool":
        if t.lower() in _TRUE:
            return True
        if t.lower() in _FALSE:
            return False
        raise UserError(f"--set {key}={text}: expected a bool (true/false), e.g. {key}=true")
    if kind == "int":
        return _parse_int(key, t)
    if kind == "float":
        try:
            v = float(t)
        except ValueError:
            raise UserError(f"--set {key}={text}: expected a float, e.g. {key}={like}") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise UserError(f"--set {key}={text}: expected a finite float")
        return v
    if kind == "str":
        return t
    # list of ints
    parts = [p for p in t.replace("[", "").replace("]", "").split(",") if p.strip()]
    if not parts:
        raise UserError(f"--set {key}={text}: expected a comma-separated list of ints, e.g. {key}=40,40")
    try:
        return [int(p.strip(), 10) for p in parts]
    except ValueError:
        raise UserError(f"--set {key}={text}: expected a comma-separated list of ints, e.g. {key}=40,40") from None


def check_value(key: str, value: Any, like: Any, source: str = "--set") -> None:
    """Type, bounds and choices of ``value`` for ``key`` (``like``: a value of the right type)."""
    kind = type_name(like)
    spec = KEYS[key]
    ok_type = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "list of ints": isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
    }[kind]
    if not ok_type:
        raise UserError(f"{source} {key}: expected a {kind}, got {value!r}")
    if kind == "float" and (value != value or value in (float("inf"), float("-inf"))):  # JSON allows NaN, Infinity
        raise UserError(f"{source} {key}={value}: expected a finite float")
    if spec.choices is not None and value not in spec.choices:
        raise UserError(f"{source} {key}={value}: expected one of {', '.join(spec.choices)}")
    if spec.min is not None:
        for v in (value if isinstance(value, list) else [value]):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < spec.min:
                raise UserError(f"{source} {key}={value}: must be >= {spec.min:g}")


def apply_overrides(config: Config, assignments: Sequence[str]) -> Config:
    """A copy of ``config`` with ``key=value`` assignments applied (typed and checked)."""
    out = dict(config)
    valid = [k for k in config if k != "config"]
    for item in assignments:
        if "=" not in item:
            raise UserError(f"--set {item}: expected key=value, e.g. --set iterations=100")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in valid:
            raise UserError(f"--set {item}: unknown key {key!r} for config {config.get('config')}; "
                            f"valid keys: {', '.join(valid)}")
        if not KEYS[key].settable:
            raise UserError(f"--set {item}: {key} is fixed by the config; choose another config "
                            f"(fastmaml configs)")
        value = parse_value(key, text, config[key])
        check_value(key, value, config[key])
        out[key] = float(value) if type_name(config[key]) == "float" else value
    check_config(out)
    return out


def check_config(config: Config) -> None:
    """Consistency between settings (each value was checked on its own already)."""
    c = config
    if c["dataset"] == "omniglot":
        if c["shots"] + c["queries"] > 20 or c["shots"] + c["eval_queries"] > 20:
            raise UserError(f"Omniglot has 20 drawings per character: shots + queries must be <= 20, got "
                            f"shots={c['shots']}, queries={c['queries']}, eval_queries={c['eval_queries']}")
    if c.get("conv_padding", "symmetric") != "symmetric" and c["model"] != "conv4":
        raise UserError(f"conv_padding={c['conv_padding']}: only for the conv4 network; this config's model is "
                        f"{c['model']}")
    if c.get("split_scheme") == "maml" and c["val_every"] > 0:
        raise UserError("split_scheme=maml has no validation split; also pass --set val_every=0")
    if c["model"] == "conv4" and c.get("max_pool", True) and c["image_size"] < 16:
        raise UserError(f"image_size={c['image_size']} is too small for four 2x2 max-pools (needs >= 16)")
    if c.get("per_step_bn", False) and c["model"] not in ("conv4", "mlp_bn"):
        raise UserError(f"per_step_bn=true needs a model with BatchNorm (conv4, mlp_bn), got model={c['model']}")
    if "imaml_lambda" in c and not c["imaml_lambda"] > 0:
        raise UserError(f"imaml_lambda={c['imaml_lambda']}: iMAML's proximal regularization must be > 0")
    for key in ("first_order_iterations", "msl_iterations"):
        if c.get(key, 0) > c["iterations"]:
            raise UserError(f"{key}={c[key]} is beyond the run's iterations={c['iterations']} (the annealing "
                            f"would never end); lower {key} or raise iterations")
    if c.get("reptile_variant") == "serial" and c.get("meta_optimizer") != "sgd":
        raise UserError("reptile_variant=serial needs meta_optimizer=sgd (meta_lr is its step size epsilon)")


def load_file(path: str) -> Config:
    """A config from a JSON file: a run's ``config.json``, or ``{"config": NAME, key: value, ...}``
    (the keys not given come from the built-in config NAME)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read config file {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), str):
        raise UserError(f"config file {path} must be a JSON object naming its base config under \"config\"")
    base = get(data["config"])
    unknown = [k for k in data if k not in base]
    if unknown:
        raise UserError(f"config file {path}: unknown keys {', '.join(unknown)} for config {data['config']}; "
                        f"valid keys: {', '.join(k for k in base if k != 'config')}")
    out = dict(base)
    for k, v in data.items():
        if k == "config":
            continue
        if type_name(base[k]) == "float" and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        check_value(k, v, base[k], source=f"config file {path}:")
        if not KEYS[k].settable and v != base[k]:
            raise UserError(f"config file {path}: {k} is fixed by config {data['config']} ({base[k]!r})")
        out[k] = v
    check_config(out)
    return out


def resolve(name_or_path: str, assignments: Sequence[str] = ()) -> Config:
    """A built-in config by name, or a JSON config file, with ``--set`` assignments applied."""
    if name_or_path in CONFIGS:
        config = get(name_or_path)
    elif name_or_path.endswith(".json") and os.path.exists(name_or_path):
        config = load_file(name_or_path)
    else:
        raise UserError(f"unknown config {name_or_path!r}; valid configs: {', '.join(CONFIGS)} "
                        "(or a config .json file)")
    return apply_overrides(config, assignments)


def differences(old: Config, new: Config, ignore: Iterable[str] = ()) -> List[Tuple[str, Any, Any]]:
    """``(key, old value, new value)`` for every key where the two configs differ."""
    skip = set(ignore)
    out = []
    keys = list(old) + [k for k in new if k not in old]
    keys.sort(key=lambda k: k != "config")  # the config's name first
    for k in keys:
        if k in skip:
            continue
        legacy = KEYS[k].absent if k in KEYS and KEYS[k].absent is not None else "<absent>"
        a, b = old.get(k, legacy), new.get(k, legacy)
        if a != b:
            out.append((k, a, b))
    return out


def format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return ",".join(str(x) for x in v)
    return str(v)


# -- `fastmaml configs` ------------------------------------------------------------------------------

COMMAND_HELP = "list the built-in configs and their settings"


def add_arguments(parser) -> None:
    parser.add_argument("name", nargs="?", help="show one config in detail (every key, its type and meaning)")


def main(args) -> int:
    if args.name is not None:
        config = get(args.name)
        print(f"{args.name}: {describe(args.name)}")
        width = max(len(k) for k in config)
        for k, v in config.items():
            if k == "config":
                continue
            print(f"  {k:<{width}}  {format_value(v):<12} {type_name(v):<12} {KEYS[k].help}")
        return 0
    for name in CONFIGS:
        config = get(name)
        print(f"{name}: {describe(name)}")
        items = [f"{k}={format_value(v)}" for k, v in config.items() if k != "config"]
        line = "   "
        for item in items:
            if len(line) + len(item) + 1 > 100:
                print(line)
                line = "   "
            line += " " + item
        print(line)
    print("\nOverride any setting with --set key=value; `fastmaml configs NAME` explains each key.")
    return 0
