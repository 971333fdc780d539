"""The fastmaml application: the ``fastmaml`` command and everything only it uses.

The library (``fastmaml.MAML`` and the algorithms, the engine, layers, kernels, models, data,
``fastmaml.distributed``, ``fastmaml.compat``) never imports this package; this package builds on it.

* the command: :mod:`.cli` (parsing and dispatch) and one module per subcommand: :mod:`.train`,
  :mod:`.evaluate`, :mod:`.plots`, :mod:`.configs` (also the built-in configs), :mod:`.bench_command`;
* training: :mod:`.learner` (device, learner and data from a config), :mod:`.run_folder` (the run
  folder's files), :mod:`.training_loop` (the iterations), :mod:`.episodes` (fixed episodes, mean and
  95% CI, shared with ``eval``), :mod:`.checkpoint`, :mod:`.metrics_file`, :mod:`.run_info`,
  :mod:`.run_guard`, :mod:`.progress`, :mod:`.termination`, :mod:`.errors`;
* data-parallel training: :mod:`.distributed_args` (the options), :mod:`.distributed_train` (the
  launcher and the ranks), :mod:`.rank_context` (a rank's collectives in the training loop).

Imports go one way, from the command down: ``train`` -> ``distributed_train`` -> ``training_loop`` ->
``rank_context`` -> ``episodes``; ``plots`` -> ``evaluate`` -> ``learner``, ``run_folder``. Importing
this package (or a command module) does not import torch: ``fastmaml --help`` answers at once.
The old flat names (``fastmaml.train``, ``fastmaml.cli``, ...) are aliases of these modules
(``fastmaml/_moved.py``).
"""
