"""Checks of what users pass to fastvae's public functions, each in one place, and the switch
for the checks that read tensor values.

Checks of types, shapes and devices always run. They run on every call, and inside a
training step each Python call meets cold caches and costs microseconds, so the common
checks first test the valid case in one expression and only then, to name what is wrong,
take the detailed path. Checks of values
(targets in [0, 1], a non-negative beta) read data, so they run only where that needs
no host synchronization: on CPU tensors, in eager mode. There, with validation on (the
default, as `torch.distributions`' validate_args), a bad value is a ValueError that names
the argument. Elsewhere (CUDA, torch.compile, torch.func) the kernels turn a target
outside [0, 1] into NaN, so a bad value still cannot pass as a plausible number.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from fastvae.ops.common import PLAIN_TENSOR_TYPES, transform_active
from fastvae.ops.likelihoods import LIKELIHOODS

REDUCTIONS = ("none", "sum", "mean", "batchmean")

_validate_values = True


def set_validate_args(enabled: bool) -> None:
    """Turn the checks of input values (see above) on (the default) or off for the process.

    Off, a target outside [0, 1] gives NaN instead of a ValueError, and the check's small
    cost (a test of the [B] per-datapoint results) is gone."""
    global _validate_values
    if not isinstance(enabled, bool):
        raise TypeError(f"set_validate_args takes True or False, got {enabled!r}")
    _validate_values = enabled


def validate_args_enabled() -> bool:
    return _validate_values


def _values_readable(*tensors: Tensor) -> bool:
    """Whether checking these tensors' values costs no host sync and is possible at all."""
    if not _validate_values or torch.compiler.is_compiling() or transform_active():
        return False
    for t in tensors:  # noqa: SIM110 - a loop costs less per call than all() over a generator
        if not t.is_cpu or type(t) not in PLAIN_TENSOR_TYPES:  # is_cpu: no torch.device built
            return False
    return True


def check_float_tensor(name: str, t: object, *, batched: bool = True) -> None:
    """A float tensor, with a batch dimension (dim 0) unless batched is False."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float32, float16, bfloat16 or "
            f"float64), got {t.dtype}; convert it with {name}.float()"
        )
    if batched and t.dim() == 0:
        raise ValueError(
            f"{name} must have a batch dimension (dim 0), got a 0-d tensor; "
            f"use {name}.reshape(1, -1) for a single datapoint"
        )


def check_same_shape(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{a_name} {list(a.shape)} and {b_name} {list(b.shape)} must have the same shape")


def check_same_device(**tensors: Tensor) -> None:
    first, *rest = tensors.values()
    for t in rest:
        if t.device != first.device:
            listing = ", ".join(f"{name} on {t.device}" for name, t in tensors.items())
            raise ValueError(f"all tensors must be on one device, got {listing}; move them with .to(device)")


def check_pair(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    """Two float tensors of one shape on one device."""
    if (
        isinstance(a, Tensor)
        and isinstance(b, Tensor)
        and a.is_floating_point()
        and b.is_floating_point()
        and a.dim() != 0
        and a.shape == b.shape
        and a.device == b.device
    ):
        return
    check_float_tensor(a_name, a)
    check_float_tensor(b_name, b)
    check_same_shape(a_name, a, b_name, b)
    check_same_device(**{a_name: a, b_name: b})


def check_broadcastable(name: str, t: object, to_name: str, to: Tensor) -> None:
    """A float tensor on to's device that broadcasts to to's shape without enlarging it: one value
    per element, or one shared along some dims (a scalar, per-feature or per-channel parameter)."""
    check_float_tensor(name, t, batched=False)
    try:
        fits = torch.broadcast_shapes(t.shape, to.shape) == to.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"{name} {list(t.shape)} must broadcast to the shape of {to_name} {list(to.shape)}: "
            f"give one value per element ({list(to.shape)}), per feature "
            f"({list(to.shape[1:])}) or a scalar ([])"
        )
    check_same_device(**{to_name: to, name: t})


def check_likelihood(likelihood: object, decoder_logvar: Tensor | None) -> None:
    """likelihood names one of fastvae.ops.likelihoods.LIKELIHOODS; a decoder log-variance goes with
    the Gaussian only."""
    check_choice("likelihood", likelihood, LIKELIHOODS)
    if decoder_logvar is not None and not LIKELIHOODS[likelihood].takes_logvar:
        raise ValueError(
            f"decoder_logvar is the log-variance of a Gaussian p(x|z), but likelihood={likelihood!r}; "
            f"pass likelihood='gaussian' with it, or leave decoder_logvar out"
        )


def check_same_batch(a_name: str, a: Tensor, b_name: str, b: Tensor, why: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{a_name} {list(a.shape)} and {b_name} {list(b.shape)} must have the same batch size (dim 0): {why}"
        )


def check_samples(samples: object) -> None:
    """The number of samples per datapoint: None (one, without a samples dim) or an int >= 1."""
    if samples is None:
        return
    if isinstance(samples, bool) or not isinstance(samples, numbers.Integral):
        raise TypeError(
            f"samples must be an int >= 1 (or None for one sample without a samples dim), got {type(samples).__name__}"
        )
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")


def check_choice(name: str, value: object, choices) -> None:
    """value is one of `choices` (names), else a ValueError that lists them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}")


def check_reduction(reduction: str) -> None:
    check_choice("reduction", reduction, REDUCTIONS)


def check_beta(beta: object, device: torch.device | None = None) -> None:
    """beta weights the KL: a finite float >= 0, or a 0-d float tensor (on the loss's device, or
    the CPU) holding one."""
    if type(beta) is float and 0 <= beta < math.inf:  # the common cases, decided at once
        return
    if not (
        type(beta) is Tensor
        and beta.dim() == 0
        and beta.is_floating_point()
        and (device is None or beta.device == device or beta.device.type == "cpu")
    ):
        _reject_beta(beta, device)
        if not isinstance(beta, Tensor):
            return
    if _values_readable(beta):
        value = beta.item()
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"beta must be a finite number >= 0 (it weights the KL term), got tensor({value})")


def _reject_beta(beta: object, device: torch.device | None) -> None:
    """Raise what is wrong with a beta check_beta's fast path did not accept; return if nothing is
    (an int, a float subclass, a tensor subclass such as a Parameter)."""
    if isinstance(beta, bool) or not isinstance(beta, (numbers.Real, Tensor)):
        raise TypeError(f"beta must be a float or a 0-d tensor, got {type(beta).__name__}")
    if isinstance(beta, numbers.Real):
        if not 0 <= beta < math.inf:  # NaN fails it too; comparisons, which torch.compile can trace
            raise ValueError(f"beta must be a finite number >= 0 (it weights the KL term), got {beta}")
        return
    if beta.dim() != 0:
        raise ValueError(
            f"beta must be a scalar: a float or a 0-d tensor, got a tensor of shape {list(beta.shape)}; "
            f"a per-datapoint weight belongs in the loss (reduction='none', then weight the rows)"
        )
    if not beta.is_floating_point():
        raise TypeError(f"beta must be a floating-point tensor, got {beta.dtype}; use beta.float()")
    if device is not None and beta.device != device and beta.device.type != "cpu":
        raise ValueError(f"beta is on {beta.device} but the loss is on {device}; move it with beta.to(device)")


def check_unit_interval(name: str, result: Tensor, target: Tensor) -> None:
    """After a likelihood whose kernels write NaN for targets outside [0, 1]: where the values
    can be read for free, raise instead, naming the argument. `result` is the op's output
    (per-datapoint rows, or elements) or a sum of it, which is NaN wherever a target was out
    of range; a sum the caller computes anyway is the cheapest to test (one value read)."""
    if not _values_readable(result, target):
        return
    if result.dim() == 0:
        value = result.item()
        if value == value:  # not NaN
            return
    elif not torch.isnan(result).any():
        return
    outside = (target < 0) | (target > 1) | torch.isnan(target)
    if outside.any():
        first = tuple(int(i) for i in outside.nonzero()[0])
        raise ValueError(
            f"{name} must lie in [0, 1] (binary data, or grey levels scaled to [0, 1]); "
            f"{name}{list(first)} = {target[first].item()!r}. Scale the data (x / 255), clamp it "
            f"(x.clamp(0, 1)), or call fastvae.set_validate_args(False) to get NaN instead"
        )
