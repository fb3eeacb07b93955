"""The C ABI as Python declares it (each family's native.py) against the C sources that define it."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from fastvae.ops import library
from fastvae.ops.registry import FAMILIES

KERNELS = Path(__file__).resolve().parent.parent / "kernels"


def _defined_in_c() -> dict:
    """Every `int fastvae_*(...)` defined with a body in kernels/*.cpp, parsed like Python's prototypes."""
    found = {}
    for source in sorted(KERNELS.glob("*.cpp")):
        text = re.sub(r"//[^\n]*|/\*.*?\*/", "", source.read_text(), flags=re.S)
        for match in re.finditer(r"extern \"C\"(?:\s+FASTVAE_API)?\s+(int\s+fastvae_\w+\s*\([^)]*\))\s*\{", text):
            found.update(library.parse_prototypes(match.group(1)))
    return found


def test_python_prototypes_equal_the_c_definitions():
    for family in FAMILIES:
        family.module("native")  # declares its functions
    defined, declared = _defined_in_c(), dict(library.DECLARED)
    assert set(declared) == set(defined), (
        f"declared in Python only: {sorted(set(declared) - set(defined))}; "
        f"defined in C only: {sorted(set(defined) - set(declared))}"
    )
    for name, params in defined.items():
        assert declared[name] == params, f"{name}: Python declares {declared[name]}, C defines {params}"


def test_header_constants_match_python():
    header = (KERNELS / "fastvae_native.h").read_text()
    version = int(re.search(r"#define FASTVAE_ABI_VERSION (\d+)", header).group(1))
    assert version == library.ABI_VERSION
    codes = dict(re.findall(r"FASTVAE_(F32|F64|BF16|F16) = (\d+)", header))
    expected = {torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16", torch.float16: "F16"}
    for dtype, code in library.DTYPE_CODES.items():
        assert int(codes[expected[dtype]]) == code, dtype
    statuses = dict(re.findall(r"FASTVAE_(OK|ERR_DTYPE) = (\d+)", header))
    assert (int(statuses["OK"]), int(statuses["ERR_DTYPE"])) == (library.STATUS_OK, library.STATUS_BAD_DTYPE)


def test_parse_prototypes_reads_pointer_spellings_and_void():
    parsed = library.parse_prototypes("int fastvae_a(void); int fastvae_b(const void *x, int64_t n,\n  double w);")
    assert parsed == {"fastvae_a": (), "fastvae_b": (("const void*", "x"), ("int64_t", "n"), ("double", "w"))}
