"""What a model costs to run on a CPU, before and after int8 dynamic quantization.

`profile` gives the parameters, the bytes of its saved weights (the `torch.save` of its state
dict, as `model.pt` holds them), its latency at batch 1 and at batch 256 and the samples/s at
256. Latency is the median of up to REPEATS timed forwards (no_grad, eval mode, on a CPU copy)
after WARMUP untimed ones, stopping early once BUDGET seconds are spent on one size, so timing a
job's models adds seconds, not minutes; `threads` is torch's intra-op thread count while timing.

`quantize` is int8 dynamic quantization of the Linear layers (weights stored int8, activations
quantized per batch at run time; conv layers stay float). torch 2.13 still ships
`torch.ao.quantization.quantize_dynamic` and it works offline on CPU, but deprecates it in
favour of the separate `torchao` package (`torchao.quantization.quantize_`), which kdcache does
not depend on; its deprecation warnings are silenced here, once, where it is called.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings

import torch
from torch import nn

from kdcache.stages import tasks
from kdcache.stages.evaluate.run import dataset_batches, eval_sums
from kdcache.stages.tasks.scoring import summarise
from kdcache.stages.train.run_folder import torch_bytes

BATCHES = (1, 256)
WARMUP, REPEATS, BUDGET = 5, 50, 1.5
QUANTIZATION = "int8 dynamic quantization of the Linear layers (torch.ao.quantization)"


def weight_bytes(model: nn.Module) -> int:
    """The size of its model.pt (stages/train/run_folder.py writes the same bytes)."""
    return len(torch_bytes(model.state_dict()))


def num_params(model: nn.Module) -> int:
    """Parameters of the float model (a quantized Linear keeps its weights as packed buffers)."""
    return sum(p.numel() for p in model.parameters())


def _rows(x, n: int):
    """The first n rows of a batch (a tensor, or a dict of tensors for token inputs), repeated
    when the batch has fewer."""
    if isinstance(x, dict):
        return {k: _rows(v, n) for k, v in x.items()}
    reps = -(-n // len(x))
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:n] if reps > 1 else x[:n]


def sample_inputs(data, task=None, rows: int = max(BATCHES)):
    """A CPU batch of `rows` real inputs from `data` (its first rows, repeated if too few)."""
    x, _ = next(iter(dataset_batches(data, rows, task=task)))
    return _rows(x, rows)


@torch.no_grad()
def latency(model: nn.Module, x, task=None) -> float:
    """Median seconds of one forward of `model` on `x` (see the module docstring)."""
    forward = tasks.get(task).logits
    for _ in range(WARMUP):
        forward(model, x)
    times: list[float] = []
    while len(times) < REPEATS and (len(times) < 3 or sum(times) < BUDGET):
        tick = time.perf_counter()
        forward(model, x)
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def profile(model: nn.Module, x, task=None) -> dict:
    """params, weight_bytes, latency_b1/latency_b256 (seconds), samples_per_sec (at 256), threads."""
    model = copy.deepcopy(model).cpu().eval()
    out = {"params": num_params(model), "weight_bytes": weight_bytes(model)}
    for b in BATCHES:
        out[f"latency_b{b}"] = latency(model, _rows(x, b), task)
    out["samples_per_sec"] = max(BATCHES) / out[f"latency_b{max(BATCHES)}"]
    out["threads"] = torch.get_num_threads()
    return out


def quantize(model: nn.Module) -> nn.Module:
    """A CPU copy of `model` with every nn.Linear as a dynamically quantized int8 Linear."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        return quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear}, torch.qint8)


def accuracy(model: nn.Module, data, task=None) -> float | None:
    """Top-1 accuracy on `data` (per token for causal-lm), on the CPU."""
    batches = dataset_batches(data, 1024, task=task)
    return summarise(eval_sums(model, batches, torch.device("cpu"), task=task))["accuracy"]


def figures(model: nn.Module, data, task=None, int8: bool = True) -> dict:
    """The float model's profile, and with `int8` that of its quantized copy (plus its accuracy
    on `data`) under ``int8``; both timed on the same real inputs."""
    x = sample_inputs(data, task)
    out = profile(model, x, task)
    if int8:
        q = quantize(model)
        # The quantized copy's parameter count is the float model's: only their storage changes.
        out["int8"] = profile(q, x, task) | {"params": out["params"]}
        out["int8"]["accuracy"] = accuracy(q, data, task)
    return out
