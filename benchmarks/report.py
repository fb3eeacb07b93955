"""Read a pytest-benchmark JSON from the fastvae suites and make it readable at a glance.

    python -m benchmarks.report RESULTS.json                # tables + RESULTS.png
    python -m benchmarks.report RESULTS.json --markdown     # the README's headline table

Prints one table per op and mode (median time, effective GB/s, % of the measured copy
bandwidth, speedup against the eager reference and against torch.compile, peak extra
memory), then the issue's targets for the fused ELBO, and writes a plot of throughput
against batch size per provider at the headline setting (`benchmarks.axes.HEADLINE`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from benchmarks.axes import HEADLINE, MODES

PROVIDER_ORDER = ("eager", "compiled", "fastvae-triton", "fastvae-native", "fastvae-torch")
OP_ORDER = ("reparameterize_kl", "bernoulli_log_likelihood", "elbo_loss")
# The GPU targets for fused elbo full at batch >= 4096: reported, never asserted.
TARGET_OP, TARGET_MODE, TARGET_MIN_BATCH = "elbo_loss", "full", 4096
TARGET_PCT_COPY, TARGET_VS_EAGER, TARGET_VS_COMPILED, TARGET_EXTRA_BUFFERS = 80.0, 3.0, 1.5, 1.0


@dataclass(frozen=True)
class Row:
    """One measured case: its extra_info plus the median time in seconds."""

    info: dict
    seconds: float

    @property
    def setting(self) -> tuple:
        """Everything but the provider: rows with the same setting are compared."""
        i = self.info
        return (i["op"], i["mode"], i["precision"], i["data"], i["latent"], i["batch"])

    @property
    def provider(self) -> str:
        return self.info["provider"]


def load(path: Path) -> tuple[dict, list[Row]]:
    """(machine_info, rows) of a --benchmark-json file; cases without figures are left out."""
    doc = json.loads(Path(path).read_text())
    rows = [Row(b["extra_info"], b["stats"]["median"]) for b in doc["benchmarks"]
            if b.get("extra_info", {}).get("op") and b.get("stats")]
    return doc.get("machine_info", {}), rows


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
        return (i["precision"] != HEADLINE["precision"], i["precision"], i["data"] or 0,
                i["latent"] or 0, i["batch"], _provider_rank(r.provider))
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
    ops = sorted({r.info["op"] for r in rows},
                 key=lambda op: OP_ORDER.index(op) if op in OP_ORDER else len(OP_ORDER))
    out = []
    for op in ops:
        for mode in MODES:
            group = [r for r in rows if r.info["op"] == op and r.info["mode"] == mode]
            if group:
                out.append((op, mode, _sorted(group)))
    return out


def _machine_line(machine: dict) -> str:
    f = machine.get("fastvae", {})
    return (f"{f.get('device_name', '?')} ({f.get('device', '?')}, {f.get('cpu_count', '?')} CPUs), "
            f"torch {f.get('torch', '?')}, triton {f.get('triton', '?')}, {f.get('date', '?')}, "
            f"copy bandwidth {f.get('copy_gbps', float('nan')):.1f} GB/s, load average (1/5/15 min) "
            f"{_load(f.get('load_average_1_5_15_min_at_start'))} at start, "
            f"{_load(f.get('load_average_1_5_15_min_at_end'))} at end")


def _load(values) -> str:
    return "?" if not values else "/".join(f"{v:.1f}" for v in values)


def print_tables(machine: dict, rows: list[Row], console) -> None:
    from rich.table import Table

    ratios = speedups(rows)
    console.print(_machine_line(machine))
    for op, mode, group in _groups(rows):
        table = Table(title=f"{op} — {mode}", title_justify="left")
        for column in ("batch", "data", "latent", "precision", "provider", "time", "GB/s",
                       "% copy", "vs eager", "vs compiled", "extra memory"):
            table.add_column(column, justify="left" if column in ("precision", "provider") else "right")
        previous = None
        for r in group:
            i = r.info
            if previous is not None and r.setting != previous:
                table.add_section()
            previous = r.setting
            s = ratios[(r.setting, r.provider)]
            table.add_row(str(i["batch"]), str(i["data"] or "-"), str(i["latent"] or "-"),
                          i["precision"], r.provider, format_time(r.seconds), f"{i['gbps']:.1f}",
                          f"{i['pct_of_copy']:.0f}%", format_ratio(s["eager"]),
                          format_ratio(s["compiled"]), format_extra_memory(i))
        console.print(table)


def target_rows(rows: list[Row]) -> list[Row]:
    """The cases the issue sets targets for: elbo full at batch >= 4096, every provider."""
    return _sorted([r for r in rows if r.info["op"] == TARGET_OP and r.info["mode"] == TARGET_MODE
                    and r.info["batch"] >= TARGET_MIN_BATCH])


def print_targets(rows: list[Row], console) -> None:
    from rich.table import Table

    ratios = speedups(rows)
    table = Table(title=(f"targets (GPU, fused): elbo full at batch >= {TARGET_MIN_BATCH}: "
                         f">= {TARGET_PCT_COPY:.0f}% of copy, >= {TARGET_VS_EAGER}x eager, "
                         f">= {TARGET_VS_COMPILED}x compiled, extra memory <= "
                         f"{TARGET_EXTRA_BUFFERS:.0f} largest-input buffer"), title_justify="left")
    for column in ("batch", "data", "latent", "precision", "provider", "% copy", "vs eager",
                   "vs compiled", "extra memory"):
        table.add_column(column)
    for r in target_rows(rows):
        i, s = r.info, ratios[(r.setting, r.provider)]
        table.add_row(str(i["batch"]), str(i["data"]), str(i["latent"]), i["precision"], r.provider,
                      f"{i['pct_of_copy']:.0f}%", format_ratio(s["eager"]), format_ratio(s["compiled"]),
                      format_extra_memory(i))
    console.print(table)


def headline_rows(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.info["precision"] == HEADLINE["precision"]
            and r.info["data"] in (None, HEADLINE["data"]) and r.info["latent"] in (None, HEADLINE["latent"])]


def markdown(machine: dict, rows: list[Row], mode: str = "full") -> str:
    """The headline setting in `mode` as a Markdown table: median time and GB/s per provider."""
    chosen = [r for r in headline_rows(rows) if r.info["mode"] == mode]
    providers = sorted({r.provider for r in chosen}, key=_provider_rank)
    cells = {(r.info["op"], r.info["batch"], r.provider): r for r in chosen}
    lines = [f"| op ({mode}, {HEADLINE['precision']}) | batch | " + " | ".join(providers) + " |",
             "|---|---:|" + "---:|" * len(providers)]
    for op, _, group in _groups(chosen):
        for batch in sorted({r.info["batch"] for r in group}):
            row = [op, str(batch)]
            for p in providers:
                r = cells.get((op, batch, p))
                row.append("-" if r is None else f"{format_time(r.seconds)} ({r.info['gbps']:.1f} GB/s)")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(machine: dict, rows: list[Row], path: Path) -> None:
    """GB/s against batch size, one line per provider, one panel per op and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(headline_rows(rows))
    ops = list(dict.fromkeys(op for op, _, _ in groups))
    fig, panels = plt.subplots(len(ops), len(MODES), figsize=(4.2 * len(MODES), 3.2 * len(ops)),
                               squeeze=False, sharex=True)
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
            ax.axhline(copy, color="grey", linestyle="--", linewidth=1, label="copy bandwidth")
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
    fig.suptitle(f"fastvae benchmarks, {HEADLINE['precision']}, data {HEADLINE['data']}, latent "
                 f"{HEADLINE['latent']}: {f.get('device_name', '?')}, torch {f.get('torch', '?')}, "
                 f"{str(f.get('date', '?'))[:10]}", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))  # room for the shared legend below the panels
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="a pytest --benchmark-json file")
    parser.add_argument("--plot", type=Path, default=None,
                        help="where to write the PNG (default: the results path with .png)")
    parser.add_argument("--markdown", action="store_true",
                        help="print only the headline table (mode full) as Markdown")
    args = parser.parse_args(argv)

    machine, rows = load(args.results)
    if not rows:
        raise SystemExit(f"{args.results} holds no measured fastvae cases (was it run with --benchmark-disable?)")
    if args.markdown:
        print(markdown(machine, rows))
        return
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=170)  # piped to a file: keep every column readable
    print_tables(machine, rows, console)
    print_targets(rows, console)
    path = args.plot or args.results.with_suffix(".png")
    plot(machine, rows, path)
    console.print(f"plot written to {path}")


if __name__ == "__main__":
    main()
