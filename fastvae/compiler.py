"""torch.compile options for code that calls fastvae.

Before each call of compiled code, dynamo checks a guard for every global, function and constant
the traced Python read. fastvae's public functions read their validation helpers, their default
arguments, the backend choice and the fused ops: about 80 guards more than the same step written
in plain PyTorch, and on the CPU each costs about 1 µs, paid at the start of every step, when the
step before has left the caches cold (docs/design.md, "Compiled code on the CPU").

    step = torch.compile(step, options=fastvae.compile_options())                   # default mode
    step = torch.compile(step, options=fastvae.compile_options("reduce-overhead"))  # or another

drops the guards on fastvae's own code (skip_fastvae_code_guards); fastvae-train compiles its
objective so.
"""

from __future__ import annotations

from collections.abc import Sequence

# Guards on what an object is (its identity, type, code, length, or which other name holds it),
# as torch 2.11 to 2.14 name them. A guard on a value (CONSTANT_MATCH, EQUALS_MATCH, HASATTR) is
# never one of these: the backend choice and set_validate_args live in values.
_IDENTITY_GUARDS = frozenset(
    {
        "BUILTIN_MATCH",
        "CLASS_MATCH",
        "CLOSURE_MATCH",
        "DUPLICATE_INPUT",
        "MODULE_MATCH",
        "NOT_PRESENT_IN_GENERIC_DICT",
        "SEQUENCE_LENGTH",
        "TYPE_MATCH",
    }
)


def _reached_through_fastvae(source: str) -> bool:
    """A guard source that starts at one of fastvae's modules, as dynamo names them."""
    return "G['__import_fastvae" in source or "G['fastvae']" in source


def skip_fastvae_code_guards(entries: Sequence) -> list[bool]:
    """A `guard_filter_fn` for torch.compile: keep every guard but those on the identity of what
    fastvae's own modules hold (its functions, classes, modules, the fused ops and their
    registries), which do not change while a process runs. Guards on values stay, so choosing
    another backend (use_backend, FASTVAE_BACKEND) still retraces, and so does everything outside
    fastvae: the model, the tensors, torch's global state.

    What is lost: rebinding one of fastvae's functions after compiling (a monkeypatch) would not
    retrace the compiled code."""
    return [not (_reached_through_fastvae(e.name) and e.guard_type in _IDENTITY_GUARDS) for e in entries]


def compile_options(mode: str | None = None) -> dict:
    """Options for torch.compile: inductor's for `mode` (a torch.compile mode name, e.g.
    "reduce-overhead"; None or "default": the default mode) and
    skip_fastvae_code_guards as the guard filter. torch.compile takes a mode or options, not both,
    and empties the options it is given: this returns a new dict on each call."""
    import torch._inductor

    options = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    options["guard_filter_fn"] = skip_fastvae_code_guards
    return options
