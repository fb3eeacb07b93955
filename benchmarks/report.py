"""Read a pytest-benchmark JSON from the fastvae suites and make it readable at a glance.

    python -m benchmarks.report RESULTS.json                # tables + RESULTS.png
    python -m benchmarks.report RESULTS.json --markdown     # the README's headline table

Prints one table per op and mode (median time, effective GB/s, % of the measured copy
bandwidth, speedup against the eager reference and against torch.compile, peak extra
memory), then the project's speed targets for the run's device (`TARGETS`, each fastvae
row with what it meets), then the training-step table (samples/s of fastvae against a
plain PyTorch loop, from bench_train.py), and writes a plot of throughput against batch
size per provider at the headline setting (`benchmarks.axes.HEADLINE`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from benchmarks.axes import HEADLINE, MODES
from benchmarks.axes import PROVIDERS as PROVIDER_ORDER
from fastvae.ops.registry import op_specs

OP_ORDER = tuple(spec.name for spec in op_specs())
TRAIN_STEP_OP = "train_step"  # benchmarks/bench_train.py: samples/s, not an op's bytes


@dataclass(frozen=True)
class Row:
    """One measured case: its extra_info plus the median time in seconds."""

    info: dict
    seconds: float

    @property
    def setting(self) -> tuple:
        """Everything but the provider: rows with the same setting are compared."""
        i = self.info
        return (i["op"], i["mode"], i["precision"], i["data"], i["latent"], i.get("samples"), i["batch"])

    @property
    def provider(self) -> str:
        return self.info["provider"]


def _measured(doc: dict) -> list[dict]:
    """The entries that carry figures (a --benchmark-disable run records none)."""
    return [b for b in doc["benchmarks"] if b.get("extra_info", {}).get("op") and b.get("stats")]


@dataclass(frozen=True)
class TrainStep:
    """One measured training step of benchmarks/bench_train.py."""

    provider: str  # "plain" | "fastvae"
    compile: str  # "eager" | "default" | "reduce-overhead"
    amp: bool
    batch_size: int
    samples_per_s: float


def load(path: Path) -> tuple[dict, list[Row], list[TrainStep]]:
    """(machine_info, op rows, training steps) of a --benchmark-json file, read once;
    cases without figures are left out."""
    doc = json.loads(Path(path).read_text())
    rows, steps = [], []
    for b in _measured(doc):
        i = b["extra_info"]
        if i["op"] == TRAIN_STEP_OP:
            steps.append(TrainStep(i["provider"], i["compile"], i["amp"], i["batch_size"], i["samples_per_s"]))
        else:
            rows.append(Row(i, b["stats"]["median"]))
    return doc.get("machine_info", {}), rows, steps


COMPILE_LABELS = {"eager": "eager", "default": "torch.compile", "reduce-overhead": "compile, reduce-overhead"}


def train_step_table(steps: list[TrainStep]) -> list[tuple[str, float | None, float | None, float | None]]:
    """(setting, plain samples/s, fastvae samples/s, fastvae / plain) per batch x compile x AMP setting."""
    rate = {(s.provider, s.compile, s.amp, s.batch_size): s.samples_per_s for s in steps}
    order = list(COMPILE_LABELS)
    out = []
    for batch, mode, amp in sorted(
        {(s.batch_size, s.compile, s.amp) for s in steps},
        key=lambda k: (k[0], order.index(k[1]) if k[1] in order else 9, k[2]),
    ):
        plain, fused = rate.get(("plain", mode, amp, batch)), rate.get(("fastvae", mode, amp, batch))
        setting = f"batch {batch}, {COMPILE_LABELS.get(mode, mode)}, {'AMP' if amp else 'fp32'}"
        out.append((setting, plain, fused, fused / plain if plain and fused else None))
    return out


def speedups(rows: list[Row]) -> dict[tuple, dict[str, float | None]]:
    """For each (setting, provider): its speedup against eager and against compiled
    (reference time / its time), None where the reference was not measured."""
    times = {(r.setting, r.provider): r.seconds for r in rows}
    out = {}
    for r in rows:
        out[(r.setting, r.provider)] = {
            ref: (times[(r.setting, ref)] / r.seconds if (r.setting, ref) in times else None)
            for ref in ("eager", "compiled")
        }
    return out


def _provider_rank(name: str) -> int:
    return PROVIDER_ORDER.index(name) if name in PROVIDER_ORDER else len(PROVIDER_ORDER)


def _sorted(rows: list[Row]) -> list[Row]:
    def key(r: Row):
        i = r.info
        return (
            i["precision"] != HEADLINE["precision"],
            i["precision"],
            i["data"] or 0,
            i["latent"] or 0,
            i.get("samples") or 0,
            i["batch"],
            _provider_rank(r.provider),
        )

    return sorted(rows, key=key)


def format_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def format_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_extra_memory(info: dict) -> str:
    """Peak extra bytes, and how many buffers the size of the largest input that is."""
    if info.get("peak_extra_bytes") is None:
        return "n/a"
    mib = info["peak_extra_bytes"] / 2**20
    return f"{mib:.1f} MiB ({info['peak_extra_bytes'] / info['largest_input_bytes']:.2f} buf)"


def _groups(rows: list[Row]) -> list[tuple[str, str, list[Row]]]:
    ops = sorted({r.info["op"] for r in rows}, key=lambda op: OP_ORDER.index(op) if op in OP_ORDER else len(OP_ORDER))
    out = []
    for op in ops:
        for mode in MODES:
            group = [r for r in rows if r.info["op"] == op and r.info["mode"] == mode]
            if group:
                out.append((op, mode, _sorted(group)))
    return out


def _machine_line(machine: dict, rows: list[Row] = ()) -> str:
    f = machine.get("fastvae", {})
    copies = [r.info["copy_gbps"] for r in rows if r.info.get("copy_gbps")]
    # Each case's "% copy" is against the copy measured beside it (benchmarks.harness).
    beside = f" ({min(copies):.1f} to {max(copies):.1f} GB/s beside the cases)" if copies else ""
    return (
        f"{f.get('device_name', '?')} ({f.get('device', '?')}, {f.get('cpu_count', '?')} CPUs, torch kernels "
        f"{f.get('aten_cpu_capability', '?')}), "
        f"torch {f.get('torch', '?')}, triton {f.get('triton', '?')}, {f.get('date', '?')}, "
        f"copy bandwidth {f.get('copy_gbps', float('nan')):.1f} GB/s at the end{beside}, "
        f"allocator: {f.get('cpu_allocator', '?')}, load average (1/5/15 min) "
        f"{_load(f.get('load_average_1_5_15_min_at_start'))} at start, "
        f"{_load(f.get('load_average_1_5_15_min_at_end'))} at end"
    )


def _load(values) -> str:
    return "?" if not values else "/".join(f"{v:.1f}" for v in values)


def print_tables(machine: dict, rows: list[Row], console) -> None:
    from rich.table import Table

    ratios = speedups(rows)
    console.print(_machine_line(machine, rows))
    for op, mode, group in _groups(rows):
        table = Table(title=f"{op} — {mode}", title_justify="left")
        for column in (
            "samples",
            "batch",
            "data",
            "latent",
            "precision",
            "provider",
            "time",
            "GB/s",
            "% copy",
            "vs eager",
            "vs compiled",
            "extra memory",
        ):
            table.add_column(column, justify="left" if column in ("precision", "provider") else "right")
        previous = None
        for r in group:
            i = r.info
            if previous is not None and r.setting != previous:
                table.add_section()
            previous = r.setting
            s = ratios[(r.setting, r.provider)]
            table.add_row(
                str(i.get("samples") or "-"),
                str(i["batch"]),
                str(i["data"] or "-"),
                str(i["latent"] or "-"),
                i["precision"],
                r.provider,
                format_time(r.seconds),
                f"{i['gbps']:.1f}",
                f"{i['pct_of_copy']:.0f}%",
                format_ratio(s["eager"]),
                format_ratio(s["compiled"]),
                format_extra_memory(i),
            )
        console.print(table)


@dataclass(frozen=True)
class Target:
    """A speed target the project set, checked against one run (reported, never asserted)."""

    label: str  # what it is about, e.g. "GPU, the fused loss"
    device: str  # the device type it applies to
    op: str
    mode: str
    min_batch: int
    latent: int | None  # None: any
    pct_copy: float
    vs_eager: float
    vs_compiled: float
    extra_buffers: float | None  # peak extra memory in largest-input buffers; None: not set

    @property
    def title(self) -> str:
        setting = f"batch >= {self.min_batch}" + ("" if self.latent is None else f", latent {self.latent}")
        memory = "" if self.extra_buffers is None else f", extra memory <= {self.extra_buffers:g} largest-input buffer"
        return (
            f"{self.label}: {self.op} {self.mode} at {setting}: >= {self.pct_copy:.0f}% of copy, "
            f">= {self.vs_eager:g}x eager, >= {self.vs_compiled:g}x compiled{memory}"
        )

    def rows(self, rows: list[Row]) -> list[Row]:
        return _sorted(
            [
                r
                for r in rows
                if r.info["op"] == self.op
                and r.info["mode"] == self.mode
                and r.info["batch"] >= self.min_batch
                and (self.latent is None or r.info["latent"] == self.latent)
            ]
        )

    def verdict(self, row: Row, ratios: dict[str, float | None]) -> str:
        """Which parts of the target a fastvae row meets; empty for a competitor."""
        if not row.provider.startswith("fastvae"):
            return ""
        checks = [("copy", row.info["pct_of_copy"] >= self.pct_copy)]
        unmeasured = [name for name in ("eager", "compiled") if ratios[name] is None]
        checks += [
            (name, ratios[name] >= minimum)
            for name, minimum in (("eager", self.vs_eager), ("compiled", self.vs_compiled))
            if ratios[name] is not None
        ]
        if self.extra_buffers is not None and row.info.get("peak_extra_bytes") is not None:
            extra = row.info["peak_extra_bytes"] / row.info["largest_input_bytes"]
            checks.append(("memory", extra <= self.extra_buffers))
        missed = [name for name, ok in checks if not ok]
        parts = (["missed: " + ", ".join(missed)] if missed else []) + (
            ["not run: " + ", ".join(unmeasured)] if unmeasured else []
        )
        return "; ".join(parts) if parts else "all met"


TARGETS = (
    Target("GPU, the fused loss", "cuda", "elbo_loss", "full", 4096, None, 85.0, 3.0, 1.5, 1.0),
    Target("GPU, the loss side with sampling", "cuda", "vae_loss", "full", 4096, None, 85.0, 3.0, 1.5, 1.0),
)


def print_targets(machine: dict, rows: list[Row], console) -> None:
    """One table per target that applies to the run's device."""
    from rich.table import Table

    ratios = speedups(rows)
    device = machine.get("fastvae", {}).get("device")
    for target in TARGETS:
        if device is not None and target.device != device:
            continue
        table = Table(title=f"target, {target.title}", title_justify="left")
        for column in (
            "batch",
            "data",
            "latent",
            "precision",
            "provider",
            "% copy",
            "vs eager",
            "vs compiled",
            "extra memory",
            "verdict",
        ):
            table.add_column(column)
        for r in target.rows(rows):
            i, s = r.info, ratios[(r.setting, r.provider)]
            table.add_row(
                str(i["batch"]),
                str(i["data"]),
                str(i["latent"]),
                i["precision"],
                r.provider,
                f"{i['pct_of_copy']:.0f}%",
                format_ratio(s["eager"]),
                format_ratio(s["compiled"]),
                format_extra_memory(i),
                target.verdict(r, s),
            )
        console.print(table)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def print_train_steps(steps: list[TrainStep], console) -> None:
    from rich.table import Table

    table = Table(title="training step (MLP VAE 784-512-256-32): samples/s", title_justify="left")
    for column in ("setting", "plain PyTorch", "fastvae", "fastvae / plain"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for setting, plain, fused, ratio in train_step_table(steps):
        table.add_row(setting, _rate(plain), _rate(fused), format_ratio(ratio))
    console.print(table)


def train_steps_markdown(steps: list[TrainStep]) -> str:
    lines = [
        "| training step | plain PyTorch (samples/s) | fastvae (samples/s) | fastvae / plain |",
        "|---|---:|---:|---:|",
    ]
    for setting, plain, fused, ratio in train_step_table(steps):
        lines.append(f"| {setting} | {_rate(plain)} | {_rate(fused)} | {format_ratio(ratio)} |")
    return "\n".join(lines)


def headline_rows(rows: list[Row]) -> list[Row]:
    """The rows of the headline setting; the importance-weighted ops' K samples are a setting of
    their own (the tables show them)."""
    return [
        r
        for r in rows
        if r.info["precision"] == HEADLINE["precision"]
        and r.info["data"] in (None, HEADLINE["data"])
        and r.info["latent"] in (None, HEADLINE["latent"])
        and r.info.get("samples") is None
    ]


def markdown(machine: dict, rows: list[Row], mode: str = "full") -> str:
    """The headline setting in `mode` as a Markdown table: median time and GB/s per provider."""
    chosen = [r for r in headline_rows(rows) if r.info["mode"] == mode]
    providers = sorted({r.provider for r in chosen}, key=_provider_rank)
    cells = {(r.info["op"], r.info["batch"], r.provider): r for r in chosen}
    lines = [
        f"| op ({mode}, {HEADLINE['precision']}) | batch | " + " | ".join(providers) + " |",
        "|---|---:|" + "---:|" * len(providers),
    ]
    for op, _, group in _groups(chosen):
        for batch in sorted({r.info["batch"] for r in group}):
            row = [op, str(batch)]
            for p in providers:
                r = cells.get((op, batch, p))
                row.append("-" if r is None else f"{format_time(r.seconds)} ({r.info['gbps']:.1f} GB/s)")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(machine: dict, rows: list[Row], path: Path) -> bool:
    """GB/s against batch size, one line per provider, one panel per op and mode; False (and
    no file) when no case of the headline setting was measured, as in a run of one case."""
    groups = _groups(headline_rows(rows))
    if not groups:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(op for op, _, _ in groups))
    fig, panels = plt.subplots(
        len(ops), len(MODES), figsize=(4.2 * len(MODES), 3.2 * len(ops)), squeeze=False, sharex=True
    )
    copy = machine.get("fastvae", {}).get("copy_gbps")
    for ax in panels.flat:
        ax.set_visible(False)  # shown again below where a mode was measured
    for op, mode, group in groups:
        ax = panels[ops.index(op)][MODES.index(mode)]
        ax.set_visible(True)
        for provider in sorted({r.provider for r in group}, key=_provider_rank):
            points = sorted((r.info["batch"], r.info["gbps"]) for r in group if r.provider == provider)
            ax.plot(*zip(*points), marker="o", label=provider)
        if copy:
            ax.axhline(copy, color="grey", linestyle="--", linewidth=1, label="copy bandwidth (end of run)")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{op} — {mode}", fontsize=10)
        ax.set_xlabel("batch size")
        ax.set_ylabel("effective GB/s")
        ax.grid(True, alpha=0.3)
    labels = {}
    for ax in panels.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    fig.legend(labels.values(), labels.keys(), loc="lower center", ncol=len(labels), fontsize=8)
    f = machine.get("fastvae", {})
    fig.suptitle(
        f"fastvae benchmarks, {HEADLINE['precision']}, data {HEADLINE['data']}, latent "
        f"{HEADLINE['latent']}: {f.get('device_name', '?')}, torch {f.get('torch', '?')}, "
        f"{str(f.get('date', '?'))[:10]}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))  # room for the shared legend below the panels
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="a pytest --benchmark-json file")
    parser.add_argument(
        "--plot", type=Path, default=None, help="where to write the PNG (default: the results path with .png)"
    )
    parser.add_argument("--markdown", action="store_true", help="print only the headline table (mode full) as Markdown")
    args = parser.parse_args(argv)

    machine, rows, steps = load(args.results)
    if not rows and not steps:
        raise SystemExit(f"{args.results} holds no measured fastvae cases (was it run with --benchmark-disable?)")
    if args.markdown:
        tables = ([markdown(machine, rows)] if rows else []) + ([train_steps_markdown(steps)] if steps else [])
        print("\n\n".join(tables))
        return
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=170)  # piped to a file: keep every column readable
    if rows:
        print_tables(machine, rows, console)
        print_targets(machine, rows, console)
    else:
        console.print(_machine_line(machine))
    if steps:
        print_train_steps(steps, console)
    if rows:
        path = args.plot or args.results.with_suffix(".png")
        if plot(machine, rows, path):
            console.print(f"plot written to {path}")
        else:
            console.print(
                "no plot: the run measured no case of the headline setting "
                f"({', '.join(f'{k} {v}' for k, v in HEADLINE.items())})"
            )


if __name__ == "__main__":
    main()
