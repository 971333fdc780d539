"""Mutation check: plant representative bugs one at a time and report which tests catch each.

    python bench/mutation_check.py                 # every mutant (about 70 min on 2 cores: 12 rebuild the extension)
    python bench/mutation_check.py --only lslr_rate_off_by_one cpp_segment_dot_col_stride
    python bench/mutation_check.py --list          # the mutants and the tests each one runs

Not part of CI's default run. For each mutant in ``MUTANTS`` it copies the repository (``git archive
HEAD``: the committed state, or the working tree with ``--worktree``) to a temporary folder, never
touching the checkout itself, applies the mutant's one-line edit, rebuilds the C++ extension in that
copy when the edit is in C++/CUDA source, runs the mutant's tests there (``python -m pytest`` with the
copy first on ``sys.path``), and records the tests that fail. A failing test counts only if it passes
on the unmutated copy (checked for exactly the failing tests). Writes bench/results/mutation_report.json
and .md; ``--only`` updates just those mutants' entries in an existing report.

Adding a mutant for new code: append a ``Mutant`` to ``MUTANTS`` (``old`` must occur exactly once in
``path``; a mutant whose ``old`` text is gone is reported as ``stale``, so refactors show up) and list
the tests that should catch it in ``tests`` (pytest arguments: files, node ids, ``-k`` expressions;
a listed test file the copy does not have is left out of the run and recorded as ``tests_missing``).
The target is every mutant ``caught``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import difflib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

# -- the tests each kind of mutant runs ------------------------------------------------------------

ENGINE_TESTS = ["tests/test_engine.py", "tests/test_mutation_gaps.py", "tests/test_oracle_independence.py",
                "tests/test_kernels_large.py::test_engine_at_P_above_100k_matches_oracle"]
CPP_TESTS = ["tests/test_cpp_kernels.py", "tests/test_kernels_large.py", "tests/test_engine.py",
             "tests/test_kernels.py", "-k", "not triton"]
PY_OP_TESTS = ["tests/test_kernels.py", "tests/test_cpp_kernels.py", "tests/test_kernels_large.py",
               "tests/test_engine.py", "-k", "not triton"]
TRITON_TESTS = ["tests/test_triton_kernels.py", "tests/test_kernels_large.py",
                "tests/test_mutation_gaps.py::test_triton_kernels_inside_the_engine"]
EVAL_TESTS = ["tests/test_evaluate_values.py", "tests/test_engine.py", "tests/test_cli.py"]
CKPT_TESTS = ["tests/test_checkpoint.py", "tests/test_cli.py"]
BN_TESTS = ["tests/test_bn_running.py"]
FUSED_TESTS = ["tests/test_fused_engine.py"]
# The fused path's layer kernels (issue 21): each backend's kernel tests against the reference, the
# engine on the fused path against the per-task oracle, the focused tests that closed this check's
# gaps, and the combinatorial grammar of fused models (each file is run when the copy has it).
FUSED_GAPS = ["tests/test_fused_mutant_gaps.py"]
FUSED_GRAMMAR = ["tests/test_fused_grammar.py"]
CPP_LAYER_TESTS = ["tests/test_layers_cpp.py", "tests/test_fused_engine.py"] + FUSED_GAPS + FUSED_GRAMMAR
TRITON_LAYER_TESTS = ["tests/test_layers_triton.py",
                      "tests/test_fused_engine.py::test_layer_kernel_backends_inside_the_engine",
                      "tests/test_mutation_gaps.py::test_triton_kernels_inside_the_engine"] + FUSED_GAPS + FUSED_GRAMMAR
RUNNER_TESTS = ["tests/test_fused_engine.py"] + FUSED_GAPS + FUSED_GRAMMAR


@dataclass
class Mutant:
    name: str
    area: str       # engine / fused op (C++) / fused op (Python) / kernel (Triton) / checkpoint / evaluation / API
    path: str       # repository-relative file
    old: str        # text replaced (must occur exactly once)
    new: str
    tests: List[str]
    bug: str        # what a user would see
    issue15: bool = False  # one of the six bugs issue 15 found uncaught


MUTANTS: List[Mutant] = [
    # -- the six that passed the whole suite before issue 15 --------------------------------------
    Mutant("lslr_rate_off_by_one", "engine", "fastmaml/inner_lr.py",
           '        if self.mode == "per_layer_per_step":\n            return lr[k], True',
           '        if self.mode == "per_layer_per_step":\n            return lr[min(k + 1, lr.shape[0] - 1)], True',
           ENGINE_TESTS, "MAML++ LSLR: step k uses step k+1's per-layer rates", issue15=True),
    Mutant("cpp_segment_dot_col_stride", "fused op (C++)", "csrc/cpu/flat_ops.cpp",
           "const int64_t c0 = b * kColBlock;", "const int64_t c0 = b * kChunk;",
           CPP_TESTS, "per-element (Meta-SGD) reductions wrong past 8,192 columns", issue15=True),
    Mutant("bn_running_stats", "engine", "fastmaml/functional.py",
           "m.training, m.track_running_stats = True, False", "m.training, m.track_running_stats = False, True",
           ENGINE_TESTS, "BatchNorm normalizes with running statistics instead of each task's batch", issue15=True),
    Mutant("eval_mse_k_minus_1", "evaluation", "fastmaml/app/evaluate.py",
           "        fast = learner.adapt(sx, sy, steps=k)\n", "        fast = learner.adapt(sx, sy, steps=k - 1)\n",
           EVAL_TESTS, "`fastmaml eval` reports the MSE after k-1 steps as 'after k steps'", issue15=True),
    Mutant("evaluate_ignores_steps", "evaluation", "fastmaml/maml.py",
           "fast = self.adapt(support_x, support_y, steps, loss_fn)",
           "fast = self.adapt(support_x, support_y, None, loss_fn)",
           EVAL_TESTS, "MAML.evaluate(steps=10) adapts with inner_steps", issue15=True),
    Mutant("engine_first_order_multistep", "engine", "fastmaml/engine/engine.py",
           "                        if owned:\n                            v.add_(gq)\n",
           "                        if owned:\n                            v.add_(gq, alpha=0.8)\n",
           ENGINE_TESTS, "first order + multi-step loss: intermediate query gradients scaled wrongly", issue15=True),
    # -- representative others --------------------------------------------------------------------
    Mutant("engine_hvp_rate_of_previous_step", "engine", "fastmaml/engine/engine.py",
           "rate, seg = self.step_rate(k, lr, device)", "rate, seg = self.step_rate(max(k - 1, 0), lr, device)",
           ENGINE_TESTS, "second-order term of step k scaled by step k-1's rate (only per-step rates differ)"),
    Mutant("engine_shared_hvp_sign", "engine", "fastmaml/engine/engine.py",
           "acc.sub_(gp * rate if scalar else gp)", "acc.add_(gp * rate if scalar else gp)",
           ENGINE_TESTS, "non-adapted parameters (ANIL body, BN affine) get the second-order term with the wrong sign"),
    Mutant("engine_recompute_wrong_checkpoint", "engine", "fastmaml/engine/engine.py",
           "self.forward_steps(loop.checkpoints[k0 // c], k0, end,",
           "self.forward_steps(loop.checkpoints[max(k0 // c - 1, 0)], k0, end,",
           ENGINE_TESTS, "memory='recompute' replays a stretch from the wrong checkpoint"),
    Mutant("default_weights_shifted", "API", "fastmaml/learner/validation.py",
           "return [0.0] * (steps - 1) + [1.0]", "return [1.0] + [0.0] * (steps - 1)",
           ENGINE_TESTS, "without multi_step_weights, J is the query loss after the first step, not the last"),
    Mutant("adapt_bn_ignored", "API", "fastmaml/layout.py",
           "return [n for n, _ in named if adapt_bn or not _is_batchnorm_param(model, n)]",
           "return [n for n, _ in named if not _is_batchnorm_param(model, n)]",
           ENGINE_TESTS, "adapt_bn=True silently does not adapt BatchNorm's scale and shift"),
    # -- issue 20: the store budget, recompute segments, the scalar-rate HVP, gradients into views --
    Mutant("engine_scalar_rate_hvp_unscaled", "engine", "fastmaml/engine/engine.py",
           "v.addcmul_(hv, rate, value=-1.0)", "v.sub_(hv)",
           FUSED_TESTS, "one scalar rate: the second-order term H (a v) computed as H v (the rate dropped)"),
    Mutant("engine_store_budget_ignored", "engine", "fastmaml/engine/engine.py",
           "                if last or used + cost <= budget:", "                if True:",
           FUSED_TESTS, "store mode keeps every state whatever the budget: memory grows with K"),
    Mutant("engine_recompute_segment_drops_last", "engine", "fastmaml/engine/engine.py",
           "end = k1 - 1 if (k1 - 1) in kept else k1", "end = k1 - 1",
           FUSED_TESTS, "recompute mode: the last step of each segment is rerun without its iterate"),
    Mutant("fused_linear_wgrad_not_in_view", "fused path (layers)", "fastmaml/layers/linear.py",
           "torch.bmm(dy.transpose(1, 2), x, out=dw_out)", "torch.bmm(dy.transpose(1, 2), x)",
           FUSED_TESTS, "fused path: an adapted Linear weight's gradient never reaches the [T, P] buffer"),
    # -- the fused layer path (fastmaml/layers): R-operator rules always taken from the reference --
    Mutant("fused_linear_rbackward_drops_dy_rx", "fused path (layers)", "fastmaml/layers/linear.py",
           "rdw = torch.baddbmm(rdw, dy.transpose(1, 2), rx, out=rdw)",
           "rdw = torch.baddbmm(rdw, dy.transpose(1, 2), rx, alpha=0.5, out=rdw)",
           ENGINE_TESTS + ["tests/test_layers.py"], "fused path: the HVP of a Linear layer halves its dy^T R{x} term"),
    Mutant("fused_cross_entropy_rbackward_sign", "fused path (layers)", "fastmaml/layers/loss.py",
           "return (pr - p * pr.sum(-1, keepdim=True)) * (scale / N)",
           "return (pr + p * pr.sum(-1, keepdim=True)) * (scale / N)",
           ENGINE_TESTS + ["tests/test_layers.py"], "fused path: the softmax cross-entropy Hessian has a wrong sign"),
    Mutant("registry_inner_update_lr_grad_sign", "fused op (Python)", "fastmaml/kernels/registry.py",
           "d_lr = torch.neg(ops.segment_dot(_fit(dout, grad), grad, lr, segments))",
           "d_lr = ops.segment_dot(_fit(dout, grad), grad, lr, segments)",
           PY_OP_TESTS, "autograd through the compiled inner_update gives the rate gradient with the wrong sign"),
    Mutant("reference_ops_reverse_step_ignores_w", "fused op (Python)", "fastmaml/kernels/flat_torch.py",
           "        out = out + w * gq\n", "        out = out + gq\n",
           PY_OP_TESTS, "the pure-PyTorch reverse_step ignores the weight w of the query gradient"),
    Mutant("cpp_inner_update_scalar_tail", "fused op (C++)", "csrc/cpu/flat_ops.cpp",
           "row_s(t, c0, c1, lr[0]);", "row_s(t, c0, c1 - (c == nchunks - 1 ? 1 : 0), lr[0]);",
           CPP_TESTS, "scalar-lr elementwise ops leave the last column of each row unwritten"),
    Mutant("cpp_fragmented_run_sum_short", "fused op (C++)", "csrc/cpu/flat_ops.cpp",
           "for (int64_t i = r.begin - c0; i < r.end - c0; ++i) s += acc[i];",
           "for (int64_t i = r.begin - c0; i < r.end - c0 - 1; ++i) s += acc[i];",
           CPP_TESTS, "per-segment reductions over many short segments drop the last element of each"),
    Mutant("triton_segment_run_loop_drops_last", "kernel (Triton)", "fastmaml/triton/ops.py",
           "for s in range(lo, hi + 1):", "for s in range(lo, hi):",
           TRITON_TESTS, "Triton per-segment reductions drop the highest segment id of each block"),
    Mutant("checkpoint_restore_skips_torch_rng", "checkpoint", "fastmaml/app/checkpoint.py",
           '    torch.set_rng_state(rng["torch"])\n', '    pass  # torch.set_rng_state(rng["torch"])\n',
           CKPT_TESTS, "a resumed run draws different random numbers than an uninterrupted one"),
    Mutant("checkpoint_compatible_skips_shapes", "checkpoint", "fastmaml/app/checkpoint.py",
           "_need(tuple(state[k].shape) == tuple(v.shape) and state[k].dtype == v.dtype, path,",
           "_need(True, path,",
           CKPT_TESTS, "a checkpoint of another model size is loaded instead of refused"),
    Mutant("eval_ci_ddof0", "evaluation", "fastmaml/app/episodes.py",
           "float(1.96 * a.std(ddof=1) / math.sqrt(a.size))", "float(1.96 * a.std(ddof=0) / math.sqrt(a.size))",
           EVAL_TESTS, "the reported 95% interval uses the population std"),
    # -- BatchNorm running statistics (bn_stats="running", fastmaml/bn_running.py) -----------------
    Mutant("bn_running_iterate_observed_twice", "engine", "fastmaml/engine/engine.py",
           "for j, it in enumerate(its[:-1]):", "for j, it in enumerate(its):",
           BN_TESTS, "an iterate counted twice: the running statistics get an extra support pass"),
    Mutant("bn_running_fused_biased_var", "API", "fastmaml/bn_running.py",
           ".pow(2).sum(dim=(1, 3, 4)) / (n - 1)", ".pow(2).sum(dim=(1, 3, 4)) / n",
           BN_TESTS, "running_var from the biased batch variance (PyTorch keeps the unbiased one)"),
    Mutant("bn_running_momentum_power", "API", "fastmaml/bn_running.py",
           "a0 = (1.0 - mom) ** F", "a0 = (1.0 - mom) ** (F - 1)",
           BN_TESTS, "the running statistics decay one update too little per call"),
    # -- issue 21: the fused path's layer kernels, every pass of every layer family ----------------
    # C++ (csrc/cpu/conv.cpp; the BatchNorm block's kernels in csrc/cpu/batchnorm_{pool,rows,passes}.inc,
    # built twice: baseline and AVX-512)
    Mutant("cpp_conv_forward_bias_of_first_task", "fused layers (C++)", "csrc/cpu/conv.cpp",
           "hb ? b[t] : Tensor()", "hb ? b[0] : Tensor()",
           CPP_LAYER_TESTS, "conv forward (C++): every task adds task 0's bias (the adapted biases ignored)"),
    Mutant("cpp_conv_wgrad_drops_last_example", "fused layers (C++)", "csrc/cpu/conv.cpp",
           "for (int64_t n = 1; n < N; ++n) dwt.addmm_(dyt[n], cols[n].t());",
           "for (int64_t n = 1; n < N - 1; ++n) dwt.addmm_(dyt[n], cols[n].t());",
           CPP_LAYER_TESTS, "conv backward (C++): the weight gradient misses each task's last example"),
    Mutant("cpp_conv_wgrad_stride_as_dilation", "fused layers (C++)", "csrc/cpu/conv.cpp",
           "at::im2col(x[t], {kh, kw}, {1, 1}, {padding, padding},\n"
           "                                         {stride, stride});",
           "at::im2col(x[t], {kh, kw}, {stride, stride}, {padding, padding},\n"
           "                                         {1, 1});",
           CPP_LAYER_TESTS, "conv backward (C++): im2col's dilation and stride swapped (wrong at stride 2 only)"),
    Mutant("cpp_bn_items_skip_last", "fused layers (C++)", "csrc/cpu/batchnorm_passes.inc",
           "const int64_t items = g.T * g.C;", "const int64_t items = g.T * g.C - 1;",
           CPP_LAYER_TESTS, "BatchNorm block (C++, all four passes): the last task's last channel never computed"),
    Mutant("cpp_bn_sum_row_tail_short", "fused layers (C++)", "csrc/cpu/batchnorm_rows.inc",
           "for (int l = 0; j < n; ++j, ++l) acc[l] += static_cast<double>(z[j]);",
           "for (int l = 0; j + 1 < n; ++j, ++l) acc[l] += static_cast<double>(z[j]);",
           CPP_LAYER_TESTS, "BatchNorm forward (C++): the mean's remainder loop (H*W mod 8) drops its last element"),
    Mutant("cpp_avx512_double_tail_mask_short", "fused layers (C++)", "csrc/cpu/batchnorm_pool.inc",
           "n >= L ? M(0xFF) : M((1u << n) - 1u)", "n >= L ? M(0xFF) : M((1u << (n - 1)) - 1u)",
           CPP_LAYER_TESTS, "BatchNorm block (C++ AVX-512 build, float64): a vector tail's mask one lane short"),
    Mutant("cpp_bn_backward_k1_uses_dbeta", "fused layers (C++)", "csrc/cpu/batchnorm_passes.inc",
           "const S k1 = static_cast<S>(static_cast<double>(ga) * sdg * Minv);",
           "const S k1 = static_cast<S>(static_cast<double>(ga) * sdb * Minv);",
           CPP_LAYER_TESTS, "BatchNorm backward (C++): dz's xh term scaled by sum da instead of sum da xh"),
    Mutant("cpp_bn_rforward_unpooled_drops_ubeta", "fused layers (C++)", "csrc/cpu/batchnorm_rows.inc",
           "const S ra = ga * rxh + ug * xh + ub;", "const S ra = ga * rxh + ug * xh;",
           CPP_LAYER_TESTS, "BatchNorm R-forward (C++, no pool; baseline build pooled too): the shift's "
           "direction dropped"),
    Mutant("cpp_bn_rbackward_k3_drops_ugamma", "fused layers (C++)", "csrc/cpu/batchnorm_passes.inc",
           "(gad * s4 + ugd * s2 + gad * s5) * Minv", "(gad * s4 + gad * s5) * Minv",
           CPP_LAYER_TESTS, "BatchNorm R-backward (C++): mean(R{dxh} xh) misses the scale direction's u_gamma S2"),
    # Triton (fastmaml/triton/layers/{conv,batchnorm,batchnorm_rop}.py; run by the interpreter on the CPU)
    Mutant("triton_conv_cin1_bias_task_stride", "fused layers (Triton)", "fastmaml/triton/layers/conv.py",
           "bv = tl.load(b_ptr + t.to(tl.int64) * O + o,", "bv = tl.load(b_ptr + o,",
           TRITON_LAYER_TESTS, "one-channel conv forward (Triton): every task adds task 0's bias"),
    Mutant("triton_conv_cin1_wgrad_split_rows_overlap", "fused layers (Triton)", "fastmaml/triton/layers/conv.py",
           "row = pid.to(tl.int64) * SPLIT + s", "row = pid.to(tl.int64) + s",
           TRITON_LAYER_TESTS, "one-channel conv weight gradient (Triton): pixel chunks (SPLIT > 1, the GPU's path) "
           "written to overlapping workspace rows"),
    Mutant("triton_bn_forward_var_drops_shift", "fused layers (Triton)", "fastmaml/triton/layers/batchnorm.py",
           "var = tl.maximum(tl.sum(s2, axis=0) / Mf - dm * dm, 0.0)", "var = tl.maximum(tl.sum(s2, axis=0) / Mf, 0.0)",
           TRITON_LAYER_TESTS, "BatchNorm forward (Triton): the shifted variance misses -(mean - K)^2 (wrong when a "
           "channel spans several blocks)"),
    Mutant("triton_bn_window_grad_odd_row", "fused layers (Triton)", "fastmaml/triton/layers/batchnorm.py",
           "inwin = m & (ho < Ho) & (wo < Wo)", "inwin = m & (wo < Wo)",
           TRITON_LAYER_TESTS, "BatchNorm backward (Triton, pooled): a dropped odd last row takes a neighbour's "
           "gradient"),
    Mutant("triton_bn_rforward_argmax_row_col_swapped", "fused layers (Triton)",
           "fastmaml/triton/layers/batchnorm_rop.py",
           "(2 * ho + p // 2) * W + 2 * wo + p % 2", "(2 * ho + p % 2) * W + 2 * wo + p // 2",
           TRITON_LAYER_TESTS, "BatchNorm R-forward (Triton, pooled): the argmax's row and column bits swapped"),
    Mutant("triton_bn_rbackward_mean_rdxh_drops_ugamma", "fused layers (Triton)",
           "fastmaml/triton/layers/batchnorm_rop.py",
           "mean_rdxh = (g * S3 + ug * S1) / Mf", "mean_rdxh = g * S3 / Mf",
           TRITON_LAYER_TESTS, "BatchNorm R-backward (Triton): mean R{dxh} misses the scale direction's u_gamma S1"),
    # the runner nodes (fastmaml/layers/<family>.py): the passes of the layers run with the torch
    # kernels (Linear, standalone activation and max-pool, losses) and their R-operator wiring
    Mutant("runner_conv_rforward_drops_bias_direction", "fused path (runner)", "fastmaml/layers/conv.py",
           "torch.cat([w, uw], dim=2), ub,", "torch.cat([w, uw], dim=2), None,",
           RUNNER_TESTS, "conv R-forward: the stacked convolution (R{x} and u_w) forgets the bias direction u_b"),
    Mutant("runner_conv_rbias_needs_rx", "fused path (runner)", "fastmaml/layers/conv.py",
           "if want_b and rd is not None:\n            rdb = rd.sum(dim=(1, 3, 4))",
           "if want_b and rd is not None and rx is not None:\n            rdb = rd.sum(dim=(1, 3, 4))",
           RUNNER_TESTS, "conv R-backward: no bias R-gradient where the input has no R-part (the first layer)"),
    Mutant("runner_linear_shared_weight_grad_dropped", "fused path (runner)", "fastmaml/layers/linear.py",
           "ctx.put(self.weight if want_w and out is None else None, dw)",
           "ctx.put(self.weight if want_w and out is not None else None, dw)",
           RUNNER_TESTS, "Linear backward: a shared (not adapted) weight's gradient is dropped"),
    Mutant("runner_linear_rforward_drops_bias_direction", "fused path (runner)", "fastmaml/layers/linear.py",
           "r = linear_rforward(s.x, r, ctx.params[self.weight], uw, ub)",
           "r = linear_rforward(s.x, r, ctx.params[self.weight], uw, None)",
           RUNNER_TESTS, "Linear R-forward: the bias direction u_b dropped"),
    Mutant("runner_linear_rbackward_drops_uw", "fused path (runner)", "fastmaml/layers/linear.py",
           "ctx.direction.get(self.weight), need_dx, want_b, dw_out=out)", "None, need_dx, want_b, dw_out=out)",
           RUNNER_TESTS, "Linear R-backward: R{dx} misses dy u_w"),
    Mutant("runner_act_rforward_ignores_slope", "fused path (runner)", "fastmaml/layers/activation.py",
           "return None if r is None else act_backward(r, s.x, self.slope)",
           "return None if r is None else act_backward(r, s.x, 0.0)",
           RUNNER_TESTS, "standalone activation R-forward: a LeakyReLU's R-pass uses ReLU's derivative"),
    Mutant("runner_act_rbackward_no_mask", "fused path (runner)", "fastmaml/layers/activation.py",
           "return None if rd is None else act_backward(rd, s.x, self.slope)",
           "return rd  # act'' = 0: nothing to add",
           RUNNER_TESTS, "standalone activation R-backward: R{dy} passed through without act'(x)"),
    Mutant("runner_maxpool_backward_hw_swapped", "fused path (runner)", "fastmaml/layers/pooling.py",
           "return maxpool_scatter(d, s.idx, s.shape[-2], s.shape[-1])",
           "return maxpool_scatter(d, s.idx, s.shape[-1], s.shape[-2])",
           RUNNER_TESTS, "standalone max-pool backward: height and width swapped (wrong on non-square maps)"),
    Mutant("runner_maxpool_rforward_pools_r", "fused path (runner)", "fastmaml/layers/pooling.py",
           "return None if r is None else maxpool_gather(r, s.idx)",
           "return None if r is None else maxpool_forward(r)[0]",
           RUNNER_TESTS, "standalone max-pool R-forward: max-pools R{x} instead of taking it at the forward's argmax"),
    Mutant("runner_ce_keeps_logits", "fused path (runner)", "fastmaml/layers/loss.py",
           'return "ce", losses, d, p', 'return "ce", losses, d, pred',
           RUNNER_TESTS, "cross-entropy forward: the HVP's softmax Hessian built from the logits, not the "
           "probabilities"),
    Mutant("runner_mse_rbackward_unscaled", "fused path (runner)", "fastmaml/layers/loss.py",
           "else mse_rbackward(saved, r, scale))",
           "else mse_rbackward(saved, r, 1.0))",
           RUNNER_TESTS, "MSE R-backward: the HVP ignores the loss's seed (latent: the engine seeds its support "
           "passes with 1; FusedModel.hvp after grad(scale=s) is s times off)"),
]

CPP_SUFFIXES = (".cpp", ".cu", ".cuh", ".h", ".hpp", ".inc")  # .inc: csrc/cpu/batchnorm_*.inc


# -- mechanics -------------------------------------------------------------------------------------

def sh(cmd: Sequence[str], cwd: Path, env: Dict[str, str], timeout: float, log: Optional[Path] = None):
    t0 = time.monotonic()
    try:
        p = subprocess.run(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=timeout, text=True)
        out, rc = p.stdout, p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or "") if isinstance(e.stdout, str) else "", 124
    if log is not None:
        log.write_text(out)
    return rc, out, time.monotonic() - t0


def make_base(dest: Path, worktree: bool) -> None:
    dest.mkdir(parents=True)
    if worktree:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                               stdout=subprocess.PIPE).stdout.decode().split("\0")
        for f in filter(None, files):
            src = REPO / f
            if src.is_file():
                (dest / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / f)
    else:
        archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=REPO, check=True,
                                 stdout=subprocess.PIPE).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def env_for(copy: Path, threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(threads)
    env["MAX_JOBS"] = "1"
    env["FASTMAML_REQUIRE_EXT"] = "1"
    env.setdefault("FASTMAML_DATA", str((REPO / ".." / "shared" / "data").resolve()))
    env.pop("FASTMAML_KERNELS", None)
    return env


def build_extension(copy: Path, env: Dict[str, str], log: Path) -> bool:
    rc, _, secs = sh([sys.executable, "setup.py", "build_ext", "--inplace"], copy, env, 1800, log)
    print(f"    built fastmaml._C in {secs:.0f} s (rc {rc})", flush=True)
    return rc == 0


def check_import(copy: Path, env: Dict[str, str]) -> None:
    # torch first: it loads libc10 & co. that fastmaml._C links to (importing fastmaml no longer imports torch)
    rc, out, _ = sh([sys.executable, "-c", "import torch, fastmaml, fastmaml._C; print(fastmaml.__file__); "
                     "print(fastmaml._C.__file__)"], copy, env, 300)
    paths = out.split()
    if rc != 0 or not paths or not all(p.startswith(str(copy)) for p in paths[-2:]):
        raise RuntimeError(f"the copy at {copy} does not import its own fastmaml and fastmaml._C:\n{out}")


def run_pytest(copy: Path, env: Dict[str, str], args: Sequence[str], tag: str, timeout: float):
    """(failed node ids, counts, seconds, rc)."""
    xml = copy / f"junit-{tag}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           f"--junitxml={xml}", *args]
    rc, out, secs = sh(cmd, copy, env, timeout, copy / f"pytest-{tag}.log")
    failed: List[str] = []
    counts = {"tests": 0, "failed": 0, "skipped": 0}
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            counts["tests"] += 1
            if case.find("skipped") is not None:
                counts["skipped"] += 1
            if case.find("failure") is not None or case.find("error") is not None:
                cls = case.get("classname", "")
                file = cls.replace(".", "/") + ".py" if cls else "?"
                failed.append(f"{file}::{case.get('name')}")
        counts["failed"] = len(failed)
    if rc == 124:
        failed.append("<timeout>")
    elif rc not in (0, 1) and not failed:
        failed.append(f"<pytest exit {rc}>")
    return failed, counts, secs, rc


def present_tests(tests: Sequence[str], copy: Path):
    """(the pytest arguments whose test files the copy has, the test files it lacks). A mutant may
    list a test file that is not written yet (or not committed, without --worktree): pytest would
    stop with "file not found", which would count as catching the mutant."""
    args: List[str] = []
    missing: List[str] = []
    for i, a in enumerate(tests):
        is_path = not a.startswith("-") and not (i > 0 and tests[i - 1] in ("-k", "-m"))
        if is_path and not (copy / a.split("::", 1)[0]).exists():
            missing.append(a)
        else:
            args.append(a)
    return args, missing


def diff_of(m: Mutant, text: str) -> str:
    after = text.replace(m.old, m.new, 1)
    return "".join(difflib.unified_diff(text.splitlines(True), after.splitlines(True), f"a/{m.path}",
                                        f"b/{m.path}", n=1))


def check_mutant(m: Mutant, base: Path, work: Path, threads: int, timeout: float, keep: bool) -> Dict:
    entry = {k: v for k, v in asdict(m).items() if k not in ("old", "new")}
    src = base / m.path
    text = src.read_text() if src.exists() else ""
    n = text.count(m.old)
    if n != 1:
        entry.update(status="stale", detail=f"the text to replace occurs {n} times in {m.path}", caught_by=[])
        return entry
    entry["diff"] = diff_of(m, text)
    copy = work / m.name
    shutil.copytree(base, copy, symlinks=True, ignore=shutil.ignore_patterns("build", "junit-*.xml", "pytest-*.log"))
    t0 = time.monotonic()
    try:
        (copy / m.path).write_text(text.replace(m.old, m.new, 1))
        env = env_for(copy, threads)
        if m.path.endswith(CPP_SUFFIXES):
            for so in copy.glob("fastmaml/_C*.so"):
                so.unlink()
            if not build_extension(copy, env, copy / "build.log"):
                entry.update(status="caught", caught_by=["<the extension no longer compiles>"])
                return entry
        check_import(copy, env)
        args, missing = present_tests(m.tests, copy)
        if missing:
            entry["tests_missing"] = missing
        failed, counts, secs, rc = run_pytest(copy, env, args, "mutant", timeout)
        entry.update(tests_run=counts["tests"], tests_failed=counts["failed"], pytest_seconds=round(secs, 1))
        real = [f for f in failed if not f.startswith("<")]
        confirmed = real
        if real:  # a failure counts only if the same test passes without the mutant
            base_env = env_for(base, threads)
            base_failed, _, _, _ = run_pytest(base, base_env, real, "baseline-" + m.name, timeout)
            confirmed = [f for f in real if f not in set(base_failed)]
            entry["failing_without_mutant"] = sorted(set(real) - set(confirmed))
        entry["caught_by"] = confirmed + [f for f in failed if f.startswith("<")]
        entry["status"] = "caught" if entry["caught_by"] else "survived"
        return entry
    finally:
        entry["seconds"] = round(time.monotonic() - t0, 1)
        if not keep:
            shutil.rmtree(copy, ignore_errors=True)


# -- report ----------------------------------------------------------------------------------------

def write_report(entries: List[Dict], meta: Dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    order = {m.name: i for i, m in enumerate(MUTANTS)}
    entries = sorted(entries, key=lambda e: order.get(e["name"], len(order)))
    summary = {s: sum(e["status"] == s for e in entries) for s in ("caught", "survived", "stale")}
    summary["total"] = len(entries)
    report = dict(meta, summary=summary, mutants=entries)
    (RESULTS / "mutation_report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Mutation check",
        "",
        f"`python bench/mutation_check.py` ({meta['source']}, {meta['date']}, torch {meta['torch']}, "
        f"{meta['machine']}). Each mutant is one planted edit in a temporary copy of the repository; a test",
        "counts as catching it when it fails with the mutant and passes without it. Seconds: the mutant's",
        "whole check (copy, rebuild of the extension for a C++ edit, its tests, the rerun of the failing",
        "tests without the mutant).",
        "",
        f"**{summary['caught']} of {summary['total']} caught**, {summary['survived']} survived, "
        f"{summary['stale']} stale.",
        "",
        "| mutant | area | file | issue 15's six | status | tests failing / run | seconds | catching tests per file |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in entries:
        per_file: Dict[str, int] = {}
        for c in e.get("caught_by", []):
            name = c.split("::", 1)[0].rsplit("/", 1)[-1]
            per_file[name] = per_file.get(name, 0) + 1
        files = ", ".join(f"`{f}` {n}" for f, n in per_file.items())
        ran = f"{len(e.get('caught_by', []))} / {e.get('tests_run', '-')}"
        secs = f"{e['seconds']:.0f}" if "seconds" in e else "-"
        lines.append(f"| {e['name']} | {e['area']} | `{e['path']}` | {'yes' if e.get('issue15') else ''} | "
                     f"{e['status']} | {ran} | {secs} | {files} |")
    lines += ["", "## The planted edits", ""]
    for e in entries:
        lines += [f"### {e['name']}", "", e["bug"] + ".", ""]
        if e.get("diff"):
            lines += ["```diff", e["diff"].rstrip("\n"), "```", ""]
        if e.get("detail"):
            lines += [e["detail"], ""]
        if e.get("caught_by"):
            lines += ["Caught by: " + ", ".join(f"`{c}`" for c in e["caught_by"][:12])
                      + (f" and {len(e['caught_by']) - 12} more" if len(e["caught_by"]) > 12 else ""), ""]
    (RESULTS / "mutation_report.md").write_text("\n".join(lines) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants (updates their report entries)")
    p.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    p.add_argument("--worktree", action="store_true", help="copy the working tree (tracked and untracked, not "
                   "ignored files) instead of the committed HEAD")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for the tests (default 1)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per pytest run")
    p.add_argument("--keep", action="store_true", help="keep the mutant copies (their logs and junit files)")
    p.add_argument("--no-report", action="store_true", help="print the results, write no report")
    args = p.parse_args(argv)

    chosen = MUTANTS
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTANTS}
        if unknown:
            p.error(f"unknown mutants {sorted(unknown)}; known: {', '.join(m.name for m in MUTANTS)}")
        chosen = [m for m in MUTANTS if m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:40s} {m.area:18s} {m.path}\n    {m.bug}\n    tests: {' '.join(m.tests)}")
        return 0

    import torch

    work = Path(tempfile.mkdtemp(prefix="fastmaml-mutants-"))
    print(f"copies under {work}", flush=True)
    base = work / "base"
    make_base(base, args.worktree)
    if not build_extension(base, env_for(base, args.threads), work / "base-build.log"):
        print("the unmutated copy does not build; see", work / "base-build.log")
        return 2
    check_import(base, env_for(base, args.threads))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, stdout=subprocess.PIPE,
                            text=True).stdout.strip()
    meta = {
        "source": ("working tree on " if args.worktree else "commit ") + commit,
        "date": _dt.date.today().isoformat(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {args.threads} test thread(s)",
    }
    entries: Dict[str, Dict] = {}
    report_path = RESULTS / "mutation_report.json"
    if args.only and report_path.exists():
        entries = {e["name"]: e for e in json.loads(report_path.read_text()).get("mutants", [])}
    try:
        for i, m in enumerate(chosen, 1):
            print(f"[{i}/{len(chosen)}] {m.name} ({m.path})", flush=True)
            e = check_mutant(m, base, work, args.threads, args.timeout, args.keep)
            entries[m.name] = e
            print(f"    {e['status']}: {len(e.get('caught_by', []))} catching tests of {e.get('tests_run', '-')} "
                  f"({e.get('seconds', 0):.0f} s)", flush=True)
            if e.get("tests_missing"):
                print(f"    (not in the copy, not run: {', '.join(e['tests_missing'])})", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    known = {m.name for m in MUTANTS}
    final = [e for n, e in entries.items() if n in known]
    if not args.no_report:
        write_report(final, meta)
        print(f"wrote {RESULTS / 'mutation_report.md'} and .json")
    survived = [e["name"] for e in final if e["status"] != "caught"]
    print("all caught" if not survived else f"not caught: {', '.join(survived)}")
    return 0 if not survived else 1


if __name__ == "__main__":
    sys.exit(main())
