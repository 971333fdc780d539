"""The four published MAML examples in their exact API pattern, with the library passed in.

Written here for fastmaml's tests and benchmark (nothing is copied from the libraries' repositories):
each class makes the same calls in the same order as its example, with the same model-construction
helpers, on offline random data in place of the downloads, so that running it once with the original
library and once with ``fastmaml.compat``'s module of the same name is "the same script with only the
import swapped".

* ``L2LSine``: learn2learn ``examples/maml_sine.py`` (``l2l.algorithms.MAML(model, lr, first_order=False,
  allow_unused=True)``, clone / adapt per task, sum of the query losses / batch size, Adam); torchmeta's
  ``Sinusoid`` + ``BatchMetaDataLoader`` replaced by random sine tasks of the same shapes.
* ``L2LOmniglot``: learn2learn ``examples/vision/maml_omniglot.py`` (``l2l.vision.models.OmniglotFC`` or
  ``OmniglotCNN``, ``fast_adapt`` with the even/odd support/query split, a training and a validation
  clone per task, ``backward()`` per task, ``p.grad.data.mul_(1 / meta_batch_size)``, Adam; then the
  meta-test loop). ``l2l.vision.benchmarks.get_tasksets('omniglot')`` downloads Omniglot and rotates
  classes with torchvision: replaced by the same pipeline over a random-image dataset
  (``l2l.data.MetaDataset``, ``FilteredMetaDataset`` splits, ``FusedNWaysKShots``, ``LoadData``,
  ``RemapLabels``, ``ConsecutiveLabels``, ``l2l.data.Taskset``, ``BenchmarkTasksets``), no rotations.
* ``HigherOmniglot``: higher ``examples/maml-omniglot.py`` (three 64-channel conv blocks with BatchNorm
  momentum 1, ``innerloop_ctx(net, SGD(lr=0.1), copy_initial_weights=False)``, 5 ``diffopt.step``s,
  ``qry_loss.backward()`` per task, Adam; the test loop with ``track_higher_grads=False``).
* ``TorchOptOmniglot``: TorchOpt ``examples/few-shot/maml_omniglot.py`` (the same net with
  ``ReLU(inplace=False)``, ``torchopt.MetaSGD(net, lr=0.1)``, ``extract_state_dict(net, by='reference',
  detach_buffers=True)`` / ``extract_state_dict(inner_opt, by='reference')`` and ``recover_state_dict``
  around every task, the mean of the stacked query losses, Adam; the test loop).

``OmniglotNShot``'s batches are replaced by random binary images of its shapes. Each example:
``ex = Example(lib, dtype=..., tasks=...)``; ``ex.meta_step()`` runs one training iteration and returns
its record (the meta-gradient as the optimizer sees it, the losses); ``ex.evaluate()`` runs the example's
evaluation part; ``ex.state()`` is the model's parameters and buffers.
"""

from __future__ import annotations

import math
import random
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn, optim

Record = Dict[str, object]


def _grads(params) -> List[torch.Tensor]:
    return [p.grad.detach().clone() for p in params]


def _state(model: nn.Module) -> List[torch.Tensor]:
    return [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]


# -- learn2learn examples/maml_sine.py ----------------------------------------------------------------
class SineModel(nn.Module):
    """The example's model: three Linear layers, ReLU between them."""

    def __init__(self, dim):
        super().__init__()
        self.hidden1 = nn.Linear(1, dim)
        self.hidden2 = nn.Linear(dim, dim)
        self.hidden3 = nn.Linear(dim, 1)

    def forward(self, x):
        x = nn.functional.relu(self.hidden1(x))
        x = nn.functional.relu(self.hidden2(x))
        return self.hidden3(x)


def sine_batches(tasks_per_batch: int, samples: int, dtype, seed: int):
    """Stand-in for torchmeta's ``BatchMetaDataLoader(Sinusoid(num_samples_per_task=samples))``: batches
    ``(inputs [B, samples, 1], targets [B, samples, 1])``, amplitude in [0.1, 5], phase in [0, pi],
    inputs in [-5, 5]."""
    g = torch.Generator().manual_seed(seed)
    while True:
        amp = torch.rand(tasks_per_batch, 1, 1, generator=g, dtype=torch.float64) * 4.9 + 0.1
        phase = torch.rand(tasks_per_batch, 1, 1, generator=g, dtype=torch.float64) * math.pi
        x = torch.rand(tasks_per_batch, samples, 1, generator=g, dtype=torch.float64) * 10 - 5
        yield x.to(dtype), (amp * torch.sin(x - phase)).to(dtype)


class L2LSine:
    library = "learn2learn"
    title = "learn2learn maml_sine.py"

    def __init__(self, l2l, dtype=torch.float64, tasks: int = 16, shots: int = 10, adapt_lr: float = 0.01,
                 meta_lr: float = 0.001, adapt_steps: int = 5, hidden_dim: int = 32, seed: int = 0):
        torch.manual_seed(seed)
        self.dtype, self.adapt_steps = dtype, adapt_steps
        self.dataloader = sine_batches(tasks, 2 * shots, dtype, seed)
        self.model = SineModel(dim=hidden_dim).to(dtype)
        self.maml = l2l.algorithms.MAML(self.model, lr=adapt_lr, first_order=False, allow_unused=True)
        self.opt = optim.Adam(self.maml.parameters(), meta_lr)
        self.lossfn = nn.MSELoss(reduction="mean")

    def meta_step(self) -> Record:
        maml, lossfn = self.maml, self.lossfn
        batch = next(self.dataloader)
        meta_train_loss = 0.0
        effective_batch_size = batch[0].shape[0]
        for i in range(effective_batch_size):
            learner = maml.clone()
            train_inputs, train_targets = batch[0][i].to(self.dtype), batch[1][i].to(self.dtype)
            x_support, y_support = train_inputs[::2], train_targets[::2]
            x_query, y_query = train_inputs[1::2], train_targets[1::2]
            for _ in range(self.adapt_steps):
                support_preds = learner(x_support)
                support_loss = lossfn(support_preds, y_support)
                learner.adapt(support_loss)
            query_preds = learner(x_query)
            query_loss = lossfn(query_preds, y_query)
            meta_train_loss += query_loss
        meta_train_loss = meta_train_loss / effective_batch_size
        self.opt.zero_grad()
        meta_train_loss.backward()
        record = {"grads": _grads(self.maml.parameters()), "losses": [meta_train_loss.item()]}
        self.opt.step()
        return record

    def evaluate(self) -> Record:
        return {}

    def state(self) -> List[torch.Tensor]:
        return _state(self.model)


# -- learn2learn examples/vision/maml_omniglot.py ------------------------------------------------------
class RandomCharacters(torch.utils.data.Dataset):
    """Offline stand-in for Omniglot: ``classes`` x ``per_class`` random binary 28x28 images (a fixed
    stroke-like pattern per class plus per-image noise), items ``(image [1, 28, 28], label)``."""

    def __init__(self, classes: int, per_class: int, dtype, seed: int):
        g = torch.Generator().manual_seed(seed)
        base = torch.rand(classes, 1, 1, 28, 28, generator=g) > 0.8
        noise = torch.rand(classes, per_class, 1, 28, 28, generator=g) > 0.95
        self.images = (base ^ noise).to(dtype).flatten(0, 1)
        self.labels = torch.arange(classes).repeat_interleave(per_class).tolist()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def omniglot_standin_tasksets(l2l, train_ways, train_samples, test_ways, test_samples, num_tasks, dtype, seed):
    """The pipeline of ``l2l.vision.benchmarks.get_tasksets('omniglot')`` over ``RandomCharacters``
    (60 classes split 36 / 12 / 12 instead of 1100 / 100 / 423; no torchvision rotations)."""
    chars = RandomCharacters(60, 4, dtype, seed)
    dataset = l2l.data.MetaDataset(chars)
    classes = list(range(60))
    random.shuffle(classes)
    splits = [l2l.data.FilteredMetaDataset(dataset, labels=classes[:36]),
              l2l.data.FilteredMetaDataset(dataset, labels=classes[36:48]),
              l2l.data.FilteredMetaDataset(dataset, labels=classes[48:])]
    tasksets = []
    for split, ways, samples in zip(splits, (train_ways, test_ways, test_ways),
                                    (train_samples, test_samples, test_samples)):
        transforms = [
            l2l.data.transforms.FusedNWaysKShots(split, n=ways, k=samples),
            l2l.data.transforms.LoadData(split),
            l2l.data.transforms.RemapLabels(split),
            l2l.data.transforms.ConsecutiveLabels(split),
        ]
        tasksets.append(l2l.data.Taskset(dataset=split, task_transforms=transforms, num_tasks=num_tasks))
    return l2l.vision.benchmarks.BenchmarkTasksets(*tasksets)


def accuracy(predictions, targets):
    predictions = predictions.argmax(dim=1).view(targets.shape)
    return (predictions == targets).sum().float() / targets.size(0)


def fast_adapt(batch, learner, loss, adaptation_steps, shots, ways, device):
    """The example's per-task step: even samples adapt, odd samples evaluate."""
    data, labels = batch
    data, labels = data.to(device), labels.to(device)
    adaptation_indices = np.zeros(data.size(0), dtype=bool)
    adaptation_indices[np.arange(shots * ways) * 2] = True
    evaluation_indices = torch.from_numpy(~adaptation_indices)
    adaptation_indices = torch.from_numpy(adaptation_indices)
    adaptation_data, adaptation_labels = data[adaptation_indices], labels[adaptation_indices]
    evaluation_data, evaluation_labels = data[evaluation_indices], labels[evaluation_indices]
    for step in range(adaptation_steps):
        train_error = loss(learner(adaptation_data), adaptation_labels)
        learner.adapt(train_error)
    predictions = learner(evaluation_data)
    valid_error = loss(predictions, evaluation_labels)
    valid_accuracy = accuracy(predictions, evaluation_labels)
    return valid_error, valid_accuracy


class L2LOmniglot:
    library = "learn2learn"
    title = "learn2learn vision/maml_omniglot.py"

    def __init__(self, l2l, dtype=torch.float64, tasks: int = 32, model: str = "fc", ways: int = 5, shots: int = 1,
                 meta_lr: float = 0.003, fast_lr: float = 0.5, adaptation_steps: int = 1, seed: int = 42):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.device = torch.device("cpu")
        self.ways, self.shots, self.steps, self.meta_batch_size = ways, shots, adaptation_steps, tasks
        self.tasksets = omniglot_standin_tasksets(l2l, train_ways=ways, train_samples=2 * shots, test_ways=ways,
                                                  test_samples=2 * shots, num_tasks=20000, dtype=dtype, seed=seed)
        if model == "fc":
            self.model = l2l.vision.models.OmniglotFC(28 ** 2, ways)
        else:
            self.model = l2l.vision.models.OmniglotCNN(ways)
        self.model.to(self.device, dtype)
        self.maml = l2l.algorithms.MAML(self.model, lr=fast_lr, first_order=False)
        self.opt = optim.Adam(self.maml.parameters(), meta_lr)
        self.loss = nn.CrossEntropyLoss(reduction="mean")
        # Taskset.sample() draws from Python's global random: each instance keeps its own stream, so
        # that two instances stepped in turn (the benchmark's side-by-side rounds) see the same tasks
        self._random = random.getstate()

    def _own_random(self, fn):
        outer = random.getstate()
        random.setstate(self._random)
        try:
            return fn()
        finally:
            self._random = random.getstate()
            random.setstate(outer)

    def _fast_adapt(self, batch, learner):
        return fast_adapt(batch, learner, self.loss, self.steps, self.shots, self.ways, self.device)

    def meta_step(self) -> Record:
        return self._own_random(self._meta_step)

    def evaluate(self) -> Record:
        return self._own_random(self._evaluate)

    def _meta_step(self) -> Record:
        maml = self.maml
        self.opt.zero_grad()
        meta_train_error = meta_train_accuracy = meta_valid_error = meta_valid_accuracy = 0.0
        for task in range(self.meta_batch_size):
            learner = maml.clone()
            batch = self.tasksets.train.sample()
            evaluation_error, evaluation_accuracy = self._fast_adapt(batch, learner)
            evaluation_error.backward()
            meta_train_error += evaluation_error.item()
            meta_train_accuracy += evaluation_accuracy.item()
            learner = maml.clone()
            batch = self.tasksets.validation.sample()
            evaluation_error, evaluation_accuracy = self._fast_adapt(batch, learner)
            meta_valid_error += evaluation_error.item()
            meta_valid_accuracy += evaluation_accuracy.item()
        for p in maml.parameters():
            p.grad.data.mul_(1.0 / self.meta_batch_size)
        record = {"grads": _grads(maml.parameters()),
                  "losses": [meta_train_error, meta_train_accuracy, meta_valid_error, meta_valid_accuracy]}
        self.opt.step()
        return record

    def _evaluate(self) -> Record:
        meta_test_error = meta_test_accuracy = 0.0
        for task in range(self.meta_batch_size):
            learner = self.maml.clone()
            batch = self.tasksets.test.sample()
            evaluation_error, evaluation_accuracy = self._fast_adapt(batch, learner)
            meta_test_error += evaluation_error.item()
            meta_test_accuracy += evaluation_accuracy.item()
        return {"losses": [meta_test_error, meta_test_accuracy]}

    def state(self) -> List[torch.Tensor]:
        return _state(self.model)


# -- higher examples/maml-omniglot.py and TorchOpt examples/few-shot/maml_omniglot.py ----------------
class NShotBatches:
    """Stand-in for ``OmniglotNShot``: ``next(mode)`` gives ``x_spt [T, n*k_spt, 1, 28, 28]``, ``y_spt [T, n*k_spt]``,
    ``x_qry [T, n*k_qry, 1, 28, 28]``, ``y_qry [T, n*k_qry]``: random binary images, labels 0..n-1."""

    def __init__(self, batchsz: int, n_way: int, k_shot: int, k_query: int, dtype, seed: int):
        self.batchsz, self.n_way, self.k_shot, self.k_query, self.dtype = batchsz, n_way, k_shot, k_query, dtype
        self.g = {"train": torch.Generator().manual_seed(seed), "test": torch.Generator().manual_seed(seed + 1)}

    def next(self, mode: str = "train"):
        g, T, n = self.g[mode], self.batchsz, self.n_way
        x_spt = (torch.rand(T, n * self.k_shot, 1, 28, 28, generator=g) > 0.8).to(self.dtype)
        x_qry = (torch.rand(T, n * self.k_query, 1, 28, 28, generator=g) > 0.8).to(self.dtype)
        y_spt = torch.arange(n).repeat_interleave(self.k_shot).expand(T, -1).contiguous()
        y_qry = torch.arange(n).repeat_interleave(self.k_query).expand(T, -1).contiguous()
        return x_spt, y_spt, x_qry, y_qry


class Flatten(nn.Module):
    """higher's example defines its own Flatten."""

    def forward(self, input):
        return input.view(input.size(0), -1)


def omniglot_net(n_way: int, inplace: bool, flatten: nn.Module, channels: int = 64) -> nn.Sequential:
    """The net of both examples: three unpadded conv blocks (BatchNorm momentum 1, 2x2 max-pool), a Linear."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3), nn.BatchNorm2d(channels, momentum=1, affine=True), nn.ReLU(inplace=inplace),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(channels, channels, 3), nn.BatchNorm2d(channels, momentum=1, affine=True),
        nn.ReLU(inplace=inplace), nn.MaxPool2d(2, 2),
        nn.Conv2d(channels, channels, 3), nn.BatchNorm2d(channels, momentum=1, affine=True),
        nn.ReLU(inplace=inplace), nn.MaxPool2d(2, 2),
        flatten, nn.Linear(channels, n_way))


class HigherOmniglot:
    library = "higher"
    title = "higher maml-omniglot.py"

    def __init__(self, higher, dtype=torch.float64, tasks: int = 32, n_way: int = 5, k_spt: int = 5,
                 k_qry: int = 15, seed: int = 1, channels: int = 64):
        torch.manual_seed(seed)
        np.random.seed(seed)
        self.higher = higher
        self.db = NShotBatches(tasks, n_way, k_spt, k_qry, dtype, seed)
        self.net = omniglot_net(n_way, True, Flatten(), channels).to(dtype)
        self.meta_opt = optim.Adam(self.net.parameters(), lr=1e-3)

    def meta_step(self) -> Record:
        higher, net = self.higher, self.net
        net.train()
        x_spt, y_spt, x_qry, y_qry = self.db.next()
        task_num, setsz, c_, h, w = x_spt.size()
        querysz = x_qry.size(1)
        n_inner_iter = 5
        inner_opt = torch.optim.SGD(net.parameters(), lr=1e-1)
        qry_losses = []
        qry_accs = []
        self.meta_opt.zero_grad()
        for i in range(task_num):
            with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(n_inner_iter):
                    spt_logits = fnet(x_spt[i])
                    spt_loss = F.cross_entropy(spt_logits, y_spt[i])
                    diffopt.step(spt_loss)
                qry_logits = fnet(x_qry[i])
                qry_loss = F.cross_entropy(qry_logits, y_qry[i])
                qry_losses.append(qry_loss.detach())
                qry_acc = (qry_logits.argmax(dim=1) == y_qry[i]).sum().item() / querysz
                qry_accs.append(qry_acc)
                qry_loss.backward()
        record = {"grads": _grads(net.parameters()), "losses": [float(sum(qry_losses) / task_num),
                                                                100. * sum(qry_accs) / task_num]}
        self.meta_opt.step()
        return record

    def evaluate(self) -> Record:
        higher, net = self.higher, self.net
        net.train()
        qry_losses, qry_accs = [], []
        x_spt, y_spt, x_qry, y_qry = self.db.next("test")
        task_num = x_spt.size(0)
        n_inner_iter = 5
        inner_opt = torch.optim.SGD(net.parameters(), lr=1e-1)
        for i in range(task_num):
            with higher.innerloop_ctx(net, inner_opt, track_higher_grads=False) as (fnet, diffopt):
                for _ in range(n_inner_iter):
                    spt_logits = fnet(x_spt[i])
                    spt_loss = F.cross_entropy(spt_logits, y_spt[i])
                    diffopt.step(spt_loss)
                qry_logits = fnet(x_qry[i]).detach()
                qry_loss = F.cross_entropy(qry_logits, y_qry[i], reduction="none")
                qry_losses.append(qry_loss.detach())
                qry_accs.append((qry_logits.argmax(dim=1) == y_qry[i]).detach())
        return {"losses": [torch.cat(qry_losses).mean().item(), 100. * torch.cat(qry_accs).float().mean().item()]}

    def state(self) -> List[torch.Tensor]:
        return _state(self.net)


class TorchOptOmniglot:
    library = "torchopt"
    title = "TorchOpt few-shot/maml_omniglot.py"

    def __init__(self, torchopt, dtype=torch.float64, tasks: int = 32, n_way: int = 5, k_spt: int = 5,
                 k_qry: int = 15, seed: int = 1, channels: int = 64):
        torch.manual_seed(seed)
        np.random.seed(seed)
        self.torchopt = torchopt
        self.db = NShotBatches(tasks, n_way, k_spt, k_qry, dtype, seed)
        self.net = omniglot_net(n_way, False, nn.Flatten(), channels).to(dtype)
        self.meta_opt = optim.Adam(self.net.parameters(), lr=1e-3)
        self.inner_opt = torchopt.MetaSGD(self.net, lr=1e-1)   # made once per epoch in the example

    def meta_step(self) -> Record:
        torchopt, net, inner_opt = self.torchopt, self.net, self.inner_opt
        net.train()
        x_spt, y_spt, x_qry, y_qry = self.db.next()
        task_num = x_spt.size(0)
        n_inner_iter = 5
        qry_losses = []
        qry_accs = []
        self.meta_opt.zero_grad()
        net_state_dict = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
        optim_state_dict = torchopt.extract_state_dict(inner_opt, by="reference")
        for i in range(task_num):
            for _ in range(n_inner_iter):
                spt_logits = net(x_spt[i])
                spt_loss = F.cross_entropy(spt_logits, y_spt[i])
                inner_opt.step(spt_loss)
            qry_logits = net(x_qry[i])
            qry_loss = F.cross_entropy(qry_logits, y_qry[i])
            qry_acc = (qry_logits.argmax(dim=1) == y_qry[i]).float().mean()
            qry_losses.append(qry_loss)
            qry_accs.append(qry_acc.item())
            torchopt.recover_state_dict(net, net_state_dict)
            torchopt.recover_state_dict(inner_opt, optim_state_dict)
        qry_losses = torch.mean(torch.stack(qry_losses))
        qry_losses.backward()
        record = {"grads": _grads(net.parameters()), "losses": [qry_losses.item(), 100.0 * np.mean(qry_accs)]}
        self.meta_opt.step()
        return record

    def evaluate(self) -> Record:
        torchopt, net = self.torchopt, self.net
        net.train()
        inner_opt = torchopt.MetaSGD(net, lr=1e-1)
        qry_losses, qry_accs = [], []
        x_spt, y_spt, x_qry, y_qry = self.db.next("test")
        task_num = x_spt.size(0)
        n_inner_iter = 5
        net_state_dict = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
        optim_state_dict = torchopt.extract_state_dict(inner_opt, by="reference")
        for i in range(task_num):
            for _ in range(n_inner_iter):
                spt_logits = net(x_spt[i])
                spt_loss = F.cross_entropy(spt_logits, y_spt[i])
                inner_opt.step(spt_loss)
            qry_logits = net(x_qry[i]).detach()
            qry_loss = F.cross_entropy(qry_logits, y_qry[i])
            qry_acc = (qry_logits.argmax(dim=1) == y_qry[i]).float().mean()
            qry_losses.append(qry_loss.item())
            qry_accs.append(qry_acc.item())
            torchopt.recover_state_dict(net, net_state_dict)
            torchopt.recover_state_dict(inner_opt, optim_state_dict)
        return {"losses": [float(np.mean(qry_losses)), 100.0 * float(np.mean(qry_accs))]}

    def state(self) -> List[torch.Tensor]:
        return _state(self.net)


EXAMPLES = {"l2l_sine": L2LSine, "l2l_omniglot": L2LOmniglot, "higher_omniglot": HigherOmniglot,
            "torchopt_omniglot": TorchOptOmniglot}


def run(example_cls, lib, iterations: int = 2, **kw) -> Dict[str, list]:
    """``iterations`` meta-steps, then the example's evaluation; every record and the final state."""
    ex = example_cls(lib, **kw)
    steps = [ex.meta_step() for _ in range(iterations)]
    return {"grads": [s["grads"] for s in steps], "losses": [s["losses"] for s in steps],
            "evaluation": ex.evaluate().get("losses", []), "state": ex.state()}


def rel(a, b) -> float:
    """Whole-list relative error ||a - b|| / ||b|| (float64)."""
    num = sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(a, b)) ** 0.5
    den = sum(float(y.double().pow(2).sum()) for y in b) ** 0.5
    return num / max(den, 1e-300)


def differences(ours: Dict[str, list], theirs: Dict[str, list]) -> Dict[str, float]:
    """Relative errors of ``ours`` against ``theirs``: the meta-gradient of each iteration (whole-gradient),
    the final parameters and buffers, and the recorded losses / accuracies."""
    assert len(ours["grads"]) == len(theirs["grads"]) and len(ours["state"]) == len(theirs["state"])
    out = {f"grad[{i}]": rel(a, b) for i, (a, b) in enumerate(zip(ours["grads"], theirs["grads"]))}
    out["state"] = rel(ours["state"], theirs["state"])
    numbers = [torch.tensor(x, dtype=torch.float64) for x in ours["losses"] + [ours["evaluation"]]]
    want = [torch.tensor(x, dtype=torch.float64) for x in theirs["losses"] + [theirs["evaluation"]]]
    out["losses"] = rel(numbers, want)
    return out


def bitwise_equal(ours: Dict[str, list], theirs: Dict[str, list]) -> bool:
    return all(torch.equal(a, b) for ga, gb in zip(ours["grads"], theirs["grads"]) for a, b in zip(ga, gb))
