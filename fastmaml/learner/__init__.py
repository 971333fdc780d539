"""The parts of the learner (:class:`fastmaml.MAML` and the algorithms built on it) other than its API.

* :mod:`.validation`: argument and input checks (``LearnerChecks``);
* :mod:`.chunking`: task chunks and the memory probe of ``task_chunk="auto"``;
* :mod:`.meta_step_template`: the checks and ``.grad`` accumulation every ``meta_step`` shares;
* :mod:`.running_statistics`: the learner's side of ``bn_stats="running"``;
* :mod:`.outputs`: ``MetaStepOutput`` and ``FastWeights``.
"""
