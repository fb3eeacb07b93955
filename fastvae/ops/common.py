"""What every op family shares: row views, dtypes, gradient scaling, and `FusedOp`, the one
mechanism that connects a fused forward/backward to PyTorch's autograd and compiler."""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad

from fastvae.backend import requested_backend, use_backend, warn_if_compiled_backward_loses_the_block


# --------------------------------------------------------------------------- rows and dtypes
def as_rows(t: Tensor) -> Tensor:
    """[B, ...] -> [B, N] with stride 1 along N; a view whenever the layout allows one.

    Strided rows (a chunk of a wider encoder output) stay views: every backend takes a
    row stride, so the common `mu, logvar = h.chunk(2, dim=1)` costs no copy."""
    if t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] <= 1):
        return t  # already rows: the common case, returned without a reshape call
    rows = t.reshape(t.shape[0], math.prod(t.shape[1:]))
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


def rows_or_none(t: Tensor | None) -> Tensor | None:
    return None if t is None else as_rows(t)


def as_sample_rows(t: Tensor, samples: int | None) -> Tensor:
    """K samples of B rows, [K, B, ...], as rows [K * B, N] (sample k of row b at row k * B + b,
    the layout of the kernels that read B-row inputs with a row period); [B, ...] as [B, N]
    when samples is None. A view whenever the layout allows one."""
    return as_rows(t if samples is None else t.flatten(0, 1))


def sample_shape(like: Tensor, samples: int | None) -> tuple[int, ...]:
    """The shape of K samples of `like` [B, ...]: [K, B, ...], or like's own for samples None."""
    return like.shape if samples is None else (samples, *like.shape)


def view_as_shape(t: Tensor, shape: Sequence[int]) -> Tensor:
    """t viewed as `shape`; t itself when it already has it (a view call costs microseconds)."""
    return t if t.shape == shape else t.view(shape)


def loss_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The dtype losses come back in and all math runs in: float64 when any input is float64
    (gradcheck), else float32 (bf16 and fp16 inputs are computed in float32)."""
    for t in tensors:  # loops, not generator expressions: these run on every eager call
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def storage_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The one dtype a kernel that reads several same-kind tensors takes: theirs if they agree,
    else the compute dtype (mixes are rare, e.g. mu and logvar are halves of one output, and
    one storage dtype per kernel keeps the compiled variants few)."""
    first = None
    for t in tensors:
        if t is None:
            continue
        if first is None:
            first = t.dtype
        elif t.dtype != first:
            return loss_dtype(*tensors)
    return first


def as_dtype(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """t in dtype (None stays None): t itself when it already is. On every call of every kernel,
    and a no-op `.to()` still costs a dispatch (microseconds) where a dtype compare costs none."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


# (parameter, target) dtypes a likelihood kernel reads, a decoder's output against the data:
# see likelihood_storage. Listing them keeps the compiled and native variants few.
LIKELIHOOD_DTYPE_PAIRS = (
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
    (torch.float64, torch.float64),
)


def likelihood_storage(param: torch.dtype, target: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """The (param, target) dtypes a likelihood kernel reads, one of LIKELIHOOD_DTYPE_PAIRS: float64
    for both if either is; the target as it is when it has the param dtype or float32 (bf16 logits
    of an AMP decoder against float32 data is the common mix), else as float32."""
    if torch.float64 in (param, target):
        return torch.float64, torch.float64
    return param, target if target in (param, torch.float32) else torch.float32


def likelihood_inputs(params: Sequence[Tensor | None], target: Tensor) -> tuple[list[Tensor | None], Tensor]:
    """A likelihood kernel's inputs as it reads them: the params (a decoder's outputs, e.g. mean and
    log-variance; None passes through) in their one storage dtype (storage_dtype), the target
    in the dtype likelihood_storage pairs with it. No copy when the dtypes already fit."""
    param_dtype, target_dtype = likelihood_storage(storage_dtype(*params), target.dtype)
    return [as_dtype(p, param_dtype) for p in params], as_dtype(target, target_dtype)


def tile_rows(t: Tensor, rows: int) -> Tensor:
    """t [T, N] -> [rows, N] with row r = t[r % T] (T divides rows): a row-periodic target as
    the likelihood kernels read it (e.g. the data [B, D] against K samples' logits [K * B, D])."""
    return t if t.shape[0] == rows else t.repeat(rows // t.shape[0], 1)


def rows_shape(t: Tensor, elementwise: bool) -> tuple[int, ...]:
    """The shape of a per-element (t's shape) or per-datapoint ([B]) result for t [B, ...]."""
    return tuple(t.shape) if elementwise else tuple(t.shape[:1])


def no_grad_placeholder(like: Tensor) -> Tensor:
    """What a gradient output holds when none was asked for: custom ops cannot return None."""
    return like.new_empty(0)


def scale_saved_grad(saved: Tensor, grad_output: Tensor) -> Tensor:
    """saved [B, ...] * grad_output ([B] or saved's shape), in saved's dtype.

    Terminal losses compute d(loss)/d(input) in the forward pass; backward only applies
    the chain rule with the upstream gradient, one elementwise multiply."""
    g = grad_output.reshape(grad_output.shape + (1,) * (saved.dim() - grad_output.dim()))
    if saved.dtype in (torch.float16, torch.bfloat16):
        # Multiply in float32 and round once: a "mean" over many elements makes g tiny,
        # and rounding g to half precision first would lose digits twice. The float32 factor
        # makes the multiply run in float32 as it writes the half-precision output: no
        # float32 copy of `saved` (on an H200 those made bf16 losses peak at 5 buffers).
        return torch.mul(saved, g.float(), out=torch.empty_like(saved, memory_format=torch.contiguous_format))
    return saved * g.to(saved.dtype)


def scale_saved_grad_(saved: Tensor, grad_output: Tensor) -> Tensor:
    """scale_saved_grad in place, for a saved gradient that backward owns and gives away: no new
    tensor the size of `saved`. Half-precision gradients are multiplied in float32 and rounded
    once here too (the float32 factor makes the multiply run in float32)."""
    g = grad_output.reshape(grad_output.shape + (1,) * (saved.dim() - grad_output.dim()))
    return saved.mul_(g.float() if saved.dtype in (torch.float16, torch.bfloat16) else g.to(saved.dtype))


# --------------------------------------------------------------------------- the saved gradient
def rows_weight(weight_divisor: int | None) -> float:
    """The weight a loss puts on a likelihood op's rows' sum: 1 / weight_divisor, 1 without one.
    The ops take the divisor (the batch size, the element count, negated for the -ELBO) rather
    than the weight: an int is a SymInt under torch.compile, where a float computed from a
    dynamic batch size is specialized on and every batch size would retrace."""
    return 1.0 if weight_divisor is None else 1.0 / weight_divisor


@functools.lru_cache(maxsize=64)  # a loss passes the same weight (-1/B) on every step
def _in_dtype(value: float, dtype: torch.dtype) -> float:
    """`value` rounded to float32 unless dtype is float64 (the losses' two dtypes), as a Python float."""
    return value if dtype == torch.float64 else struct.unpack("f", struct.pack("f", value))[0]


def is_the_weight(grad_rows: Tensor, weight: float) -> bool:
    """Whether the gradient reaching per-datapoint rows [B] is `weight` itself, broadcast.

    A loss written as `weight * rows.sum()` (a mean, a batch mean, the -ELBO) hands its
    rows exactly that in `loss.backward()`. A kernel that wrote weight * d(rows)/d(input)
    in the forward pass has then already computed the final gradient, and backward can
    hand it over without a pass over [B, D]. Checked only where that costs nothing: eager
    on the CPU, a plain tensor (a CUDA read would synchronize; a trace or a fake tensor has
    no value to read), and no double backward being recorded."""
    return (
        type(grad_rows) is Tensor
        and grad_rows.dim() == 1
        and grad_rows.numel() > 0
        and grad_rows.stride(0) == 0
        and grad_rows.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not torch.is_grad_enabled()
        and grad_rows[0].item() == _in_dtype(weight, grad_rows.dtype)
    )


def saved_grad_rescaler(
    grad_rows: Tensor, weight_divisor: int | None, handed_over: bool, traced: bool
) -> tuple[Callable[[Tensor], Tensor], bool]:
    """How backward turns a gradient saved in the forward pass, d(rows)/d(input) / weight_divisor,
    into the input's gradient for the upstream gradient grad_rows: (rescale, given_away).

    rescale hands the saved gradient over as it is when grad_rows is the weight itself (once:
    after that its receiver owns it, see is_the_weight); else it multiplies by grad_rows / weight,
    in place when the saved gradient is backward's own (eager: no second [B, D] buffer), out of
    place when traced (a saved output must stay as it is). given_away: backward no longer owns
    the saved gradient, and a second backward must recompute it."""
    if weight_divisor is None:
        factor = grad_rows
    else:
        weight = rows_weight(weight_divisor)
        if not handed_over and is_the_weight(grad_rows, weight):
            return (lambda saved: saved), True
        factor = grad_rows / weight
    if traced:
        return (lambda saved: scale_saved_grad(saved, factor)), False
    return (lambda saved: scale_saved_grad_(saved, factor)), True


# --------------------------------------------------------------------------- how a call is observed
def transform_active() -> bool:
    """(Eager only: under dynamo's trace it reads as True.) A torch.func transform (grad, vjp, jvp,
    jacrev, jacfwd, hessian, vmap) or forward-mode AD is running: the fused kernels have no
    forward-mode or batching rules, so the op's definition in torch ops (its composite) runs
    instead, correct for every transform."""
    return torch._C._functorch.peek_interpreter_stack() is not None or forward_ad._current_level >= 0


# In a compiled graph on the CPU, an op whose work (FusedOp's work_elements: its largest tensor,
# a sampler's K samples) is at most this many elements runs as its composite: inductor fuses
# those torch ops into the graph's own C++ loops. As one opaque custom op it costs a call back
# into Python and ctypes, and its kernel runs cold between the graph's matrix products
# (`python -m benchmarks.compiled_cpu_crossover` measures both ways). Read when a graph is
# traced, not guarded: a change takes effect in graphs traced after it (torch._dynamo.reset()).
COMPILED_CPU_COMPOSITE_MAX_ELEMENTS = 1 << 18
# The same choice in a compiled graph on CUDA; None: never, every call stays the custom op's node.
# On an H200 the default-mode step with the nodes ran at 0.74x to 0.79x of plain PyTorch's, each
# node a call back into Python and Triton's dispatch; whether the composite does better there (or
# a triton_op) is what the prepared GPU run's launch_overhead.py and its composite train A/B
# measure (docs/design.md). Tests and benchmarks set it to try the composite on CUDA.
COMPILED_CUDA_COMPOSITE_MAX_ELEMENTS: int | None = None


def largest_input(*args) -> int:
    """The elements of a call's largest tensor argument: the size of most ops' work."""
    largest = 0
    for a in args:  # a loop, not max(..., default=0): torch 2.11's dynamo cannot trace that
        if isinstance(a, Tensor) and a.numel() > largest:
            largest = a.numel()
    return largest


def composite_in_compiled_graph(args: Sequence, work_elements: Callable[..., int] = largest_input) -> bool:
    """(While a graph is traced, under the default backend.) Whether this call lowers to the op's
    composite: work_elements(*args) at most COMPILED_CPU_COMPOSITE_MAX_ELEMENTS for CPU tensors,
    COMPILED_CUDA_COMPOSITE_MAX_ELEMENTS for CUDA tensors (None: never)."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    if not tensors:
        return False
    device = tensors[0].device.type
    if any(t.device.type != device for t in tensors):
        return False
    if device == "cpu":
        limit = COMPILED_CPU_COMPOSITE_MAX_ELEMENTS
    elif device == "cuda":
        limit = COMPILED_CUDA_COMPOSITE_MAX_ELEMENTS
    else:
        return False
    return limit is not None and work_elements(*args) <= limit


# The in-graph ops (see FusedOp): CompositeImplicitAutograd ops, whose Python body runs only while
# a graph is traced (dynamo's fake-tensor pass, then AOTAutograd's), never per call.
_IN_GRAPH_LIBRARY = torch.library.Library("fastvae", "FRAGMENT")


def define_in_graph_op(
    custom_op, composite: Callable, work_elements: Callable[..., int], lowered: Callable | None = None
):
    """`fastvae::<name>_in_graph(bool default_backend, <the custom op's arguments>)`, the op torch.compile
    records for a call of `custom_op`. Its body decides, as the graph is traced, what the graph
    holds instead: for a small CPU call under the default backend (see composite_in_compiled_graph)
    the torch ops of `lowered` (the composite with a cheaper derivative, an autograd.Function), or
    of the composite itself inside a torch.func transform, which such a Function does not support;
    else the custom op's node. Dynamo guards only on what the caller passes (default_backend among
    it): nothing the composite reads (its helpers, its Philox constants, torch functions) becomes
    a guard checked before every call of the compiled code."""
    schema = custom_op._opoverload._schema
    name = f"{schema.name.split('::')[1]}_in_graph"
    arguments = str(schema)[str(schema).index("(") + 1 :]  # "Tensor mu, ...) -> (Tensor, ...)"
    _IN_GRAPH_LIBRARY.define(f"{name}(bool default_backend, {arguments}")

    def lower(default_backend: bool, *args):
        if default_backend and composite_in_compiled_graph(args, work_elements):
            return tuple((composite if lowered is None or transform_active() else lowered)(*args))
        if not default_backend:
            device = next(a.device for a in args if isinstance(a, Tensor))
            warn_if_compiled_backward_loses_the_block(name.removesuffix("_in_graph"), device)
        return tuple(custom_op(*args))

    _IN_GRAPH_LIBRARY.impl(name, lower, "CompositeImplicitAutograd")
    return getattr(torch.ops.fastvae, name).default


# Tensors whose values and dispatch are torch's own: a subclass (a fake or functional tensor, a
# user's __torch_function__ type) may run any code on each op, or have no values to read.
PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def plain_eager_call(args: Sequence) -> bool:
    """True when nothing but eager PyTorch can observe this call: no torch.compile or export
    trace, no torch.func transform or forward-mode AD (see transform_active), no torch function
    or dispatch mode (fake tensors, profilers that record aten ops, FlopCounter), only plain
    tensors.

    One function of flat checks, on every eager call of every op: inside a training step each
    Python call runs with cold caches and costs microseconds (docs/design.md, "The eager path")."""
    if (
        torch.compiler.is_compiling()
        or torch._C._functorch.peek_interpreter_stack() is not None
        or forward_ad._current_level >= 0
        or torch._C._len_torch_function_stack()
        or torch._C._len_torch_dispatch_stack()
    ):
        return False
    for a in args:  # noqa: SIM110 - a loop costs less per call than all() over a generator
        if isinstance(a, Tensor) and type(a) not in PLAIN_TENSOR_TYPES:
            return False
    return True


def composite_vjp(
    composite: Callable, inputs: Sequence, grads: Sequence[Tensor | None], needs_input_grad: Sequence[bool]
) -> list[Tensor | None]:
    """Input gradients of `composite(*inputs)` (the op's definition in torch ops) for the
    output gradients `grads`, recorded so they can be differentiated again.

    Backward uses this when grad mode is on inside it (create_graph=True: a gradient penalty,
    gradgradcheck, a Hessian-vector product). The kernels' saved gradients are constants to
    autograd, so differentiating them again would drop every second-order term."""
    wrt = [i for i, needs in enumerate(needs_input_grad) if needs]
    with torch.enable_grad():
        outputs = composite(*inputs)
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        found = (
            torch.autograd.grad(
                [o for o, _ in pairs],
                [inputs[i] for i in wrt],
                [g for _, g in pairs],
                create_graph=True,
                allow_unused=True,
            )
            if pairs
            else [None] * len(wrt)
        )
    result: list[Tensor | None] = [None] * len(inputs)
    for i, grad in zip(wrt, found):
        result[i] = grad if grad is not None else torch.zeros_like(inputs[i])
    return result


def _backward_on_the_forwards_backend(setup_context: Callable, backward: Callable) -> tuple[Callable, Callable]:
    """setup_context and backward such that backward, and every kernel it runs (a backward op, a
    recomputed forward), uses the backend the forward was asked for. use_backend() is
    thread-local, and autograd runs a CUDA graph's backward on a thread of its own, where the
    block's choice is not seen: without this, `with use_backend("torch")` around a CUDA forward
    would run Triton kernels in its backward."""

    def setup_recording_backend(ctx, inputs, output) -> None:
        ctx.backend = requested_backend()
        setup_context(ctx, inputs, output)

    def backward_on_recorded_backend(ctx, *grads):
        if requested_backend() == ctx.backend:  # the common case: no block to enter on the hot path
            return backward(ctx, *grads)
        with use_backend(ctx.backend):
            return backward(ctx, *grads)

    return setup_recording_backend, backward_on_recorded_backend


class FusedOp:
    """A fused op as fastvae.functional calls it: one forward, setup_context and backward,
    reachable two ways that run the same three functions, and a composite for transforms.

    - `custom_op`, the registered torch.library op: what torch.compile, export, fake tensors,
      dispatch modes and torch.library.opcheck see (one opaque graph node).
    - For a plain eager call, a torch.autograd.Function built from the same functions: a
      Python custom op crosses the dispatcher several times per call (Python autograd kernel,
      redispatch, Python implementation), which `python -m benchmarks.eager_paths` measures
      against this route.
    - `composite(*args)`, the same outputs from torch ops (the op's definition), under
      torch.func transforms and forward-mode AD (see `transform_active`).
    - `in_graph`, what torch.compile records: an op that lowers, as the graph is traced, to the
      composite for a small CPU call or to the custom op's node (see `define_in_graph_op`).

    An op without backward (a backward op itself) calls `forward` directly in eager mode,
    unless its inputs require grad under grad mode: then the custom op raises torch's own
    error for an op without a derivative instead of silently detaching."""

    def __init__(
        self,
        custom_op,
        forward: Callable,
        composite: Callable,
        setup_context: Callable | None = None,
        backward: Callable | None = None,
        work_elements: Callable[..., int] = largest_input,
        lowered: Callable | None = None,
        eager_route: Callable | None = None,
    ) -> None:
        """work_elements(*args): the size of a call's work, which picks the composite or the node in
        a compiled CPU graph (see composite_in_compiled_graph); the largest input unless the op
        writes more than it reads (a sampler's K samples). lowered: what such a graph gets instead
        of the composite, the same outputs with a cheaper derivative (see define_in_graph_op).
        eager_route(*args): the op's outputs by a route with its autograd in C++
        (fastvae.ops.eager_extension) for a plain eager call it takes, None for one it does not."""
        self.custom_op, self.forward, self.composite = custom_op, forward, composite
        self.eager_route = eager_route
        # A backward op (no backward of its own) runs only inside its forward op's backward, which
        # runs only when that forward stayed a node: it stays a node too, whatever its size.
        self.in_graph = None
        self._function = None
        if backward is not None:
            setup_context, backward = _backward_on_the_forwards_backend(setup_context, backward)
            custom_op.register_autograd(backward, setup_context=setup_context)
            self.in_graph = define_in_graph_op(custom_op, composite, work_elements, lowered)

            def function_forward(ctx, *args):
                # The ctx-first form: with a separate setup_context, Function.apply runs
                # inspect.signature on every call.
                output = forward(*args)
                ctx.eager = True  # setup_context may keep tensors on ctx (see bernoulli/op.py)
                setup_context(ctx, args, output)
                return output

            self._function = type(
                f"{custom_op._name}_eager",
                (torch.autograd.Function,),
                {
                    "forward": staticmethod(function_forward),
                    "backward": staticmethod(backward),
                },
            )

    def __call__(self, *args):
        if plain_eager_call(args):  # the common case first, decided by one function
            if self.eager_route is not None:
                outputs = self.eager_route(*args)
                if outputs is not None:
                    return outputs
            if self._function is not None:
                return self._function.apply(*args)
            if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
                return self.custom_op(*args)
            return self.forward(*args)
        if torch.compiler.is_compiling():  # dynamo: one opaque node, or torch ops inductor fuses
            if self.in_graph is not None:
                # The backend choice is read here, in the trace, so that dynamo guards on it:
                # choosing another backend retraces.
                return self.in_graph(requested_backend() == "auto", *args)
            return self.custom_op(*args)
        if transform_active():
            return self.composite(*args)
        return self.custom_op(*args)
