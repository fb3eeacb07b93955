"""The benchmark bookkeeping: axes, minimum bytes, and the report's arithmetic and outputs.

The report tests feed it a small results document built here with chosen times, so the
expected speedups follow from those times; no measured figure is asserted anywhere."""

import json

import pytest
import torch

from benchmarks import axes, report
from benchmarks.axes import Case, precisions_for
from benchmarks.harness import min_bytes
from fastvae.ops.registry import op_specs

from helpers import needs_library, run_without_interpreter, without_a_gpu

CPU = torch.device("cpu")
SPECS = {spec.name: spec for spec in op_specs()}
ELBO, REPARAMETERIZE_KL = SPECS["elbo_loss"], SPECS["reparameterize_kl"]


def _case(spec, mode, precision="fp32", batch=4096, data=784, latent=32, device=CPU):
    return Case(
        spec.name,
        mode,
        axes.EAGER,
        precisions_for(device)[precision],
        batch,
        data if "data" in spec.axes else None,
        latent if "latent" in spec.axes else None,
    )


def test_elbo_full_bytes_are_inputs_read_once_and_gradients_written_once():
    B, D, L = 4096, 784, 32
    reads = (B * D + B * D + B * L + B * L) * 4  # logits, target, mu, logvar
    writes = (B * D + B * L + B * L) * 4  # grads of logits, mu, logvar
    scalars = 4 + 4  # the loss and its upstream gradient
    assert min_bytes(ELBO, _case(ELBO, "full")) == reads + writes + scalars


def test_bytes_follow_each_tensors_dtype_under_amp():
    B, L = 1024, 32
    case = _case(REPARAMETERIZE_KL, "forward", precision="amp", batch=B, latent=L)
    # mu, logvar in bf16 read; z in bf16 and kl [B] in float32 written.
    assert min_bytes(REPARAMETERIZE_KL, case) == 3 * B * L * 2 + B * 4


def test_default_cases_are_the_headline_and_the_sweep_adds_every_mode_and_the_reference():
    default = axes.cases(ELBO.name, ELBO.axes, CPU)
    sweep = axes.cases(ELBO.name, ELBO.axes, CPU, "sweep")
    assert {c.provider.name for c in default} == {"eager", "compiled", "fastvae-native"}
    assert {c.provider.name for c in sweep} == {"eager", "compiled", "fastvae-native", "fastvae-torch"}
    assert {c.mode for c in default} == {"full"} and {c.mode for c in sweep} == set(axes.MODES)
    assert {c.batch for c in default} == {128, 1024, 4096}
    assert set(default) < set(sweep)
    assert "fp16" not in {c.precision.name for c in sweep}  # fp16 is a CUDA-only setting
    ids = [c.id for c in sweep]
    assert len(ids) == len(set(ids))


def test_samples_grids_run_the_importance_weighted_ops_and_only_them():
    """The IWAE setting (K = 5 and 50 at batch 128) is a grid of its own: the ops with a samples axis
    run on it and nowhere else, and the others never see it."""
    iwae = SPECS["iwae_loss"]
    cases = axes.cases(iwae.name, iwae.axes, CPU)
    assert {(c.samples, c.batch, c.data, c.latent) for c in cases} == {(5, 128, 784, 32), (50, 128, 784, 32)}
    assert "iwae_loss-full-eager-fp32-K50-B128-D784-L32" in {c.id for c in cases}
    assert all(c.samples is None for c in axes.cases(ELBO.name, ELBO.axes, CPU, "sweep"))
    case = cases[0]
    samples, batch, data, latent = case.samples, case.batch, case.data, case.latent
    # logits, x, z, mu, logvar read; grads of logits, z, mu, logvar written; the loss and its gradient.
    reads = (samples * batch * data + batch * data + samples * batch * latent + 2 * batch * latent) * 4
    writes = (samples * batch * data + samples * batch * latent + 2 * batch * latent) * 4
    assert min_bytes(iwae, case) == reads + writes + 4 + 4


def test_cuda_providers_are_the_competitors_and_triton():
    names = [p.name for p in axes.providers_for(torch.device("cuda"))]
    assert names == ["eager", "compiled", "fastvae-triton"]


def _entry(provider, seconds, *, op="elbo_loss", mode="full", batch=4096, latent=32, peak=None):
    nbytes = 1_000_000
    info = {
        "op": op,
        "mode": mode,
        "provider": provider,
        "batch": batch,
        "data": 784,
        "latent": latent,
        "precision": "fp32",
        "min_bytes": nbytes,
        "gbps": nbytes / seconds / 1e9,
        "copy_gbps": 10.0,
        "pct_of_copy": 100 * nbytes / seconds / 1e9 / 10.0,
        "largest_input_bytes": 400_000,
        "peak_extra_bytes": peak,
    }
    return {"name": f"{op}[{mode}-{provider}-B{batch}]", "extra_info": info, "stats": {"median": seconds}}


def _train_entry(provider, compile_mode, amp, samples_per_s):
    info = {
        "op": "train_step",
        "provider": provider,
        "compile": compile_mode,
        "amp": amp,
        "batch_size": 128,
        "samples_per_s": samples_per_s,
    }
    return {"name": f"train_step[{provider}]", "extra_info": info, "stats": {"median": 128 / samples_per_s}}


@pytest.fixture
def results(tmp_path):
    doc = {
        "machine_info": {"fastvae": {"device": "cuda", "device_name": "test GPU", "copy_gbps": 10.0}},
        "benchmarks": [
            _entry("eager", 4e-3),
            _entry("compiled", 2e-3),
            _entry("fastvae-triton", 1e-3),
            _entry("eager", 1e-3, batch=64),
            _entry("fastvae-triton", 5e-4, batch=64, peak=400_000),
            # the GPU target: 4x eager and 2x compiled, but 1e6 B / 1e-3 s is 10% of copy
            _entry("eager", 4e-3, op="vae_loss", latent=64),
            _entry("compiled", 2e-3, op="vae_loss", latent=64),
            _entry("fastvae-triton", 1e-3, op="vae_loss", latent=64),
            _train_entry("plain", "eager", False, 1000.0),
            _train_entry("fastvae", "eager", False, 1500.0),
            _train_entry("plain", "default", True, 2000.0),
            {"name": "disabled run", "extra_info": {}, "stats": None},
        ],
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(doc))
    return path


def test_speedups_are_reference_time_over_provider_time(results):
    _, rows, _ = report.load(results)
    assert len(rows) == 8  # training steps and the entry without figures are left out
    ratios = report.speedups(rows)
    native = next(r for r in rows if r.provider == "fastvae-triton" and r.info["batch"] == 4096)
    assert ratios[(native.setting, "fastvae-triton")] == {"eager": pytest.approx(4.0), "compiled": pytest.approx(2.0)}
    small = next(r for r in rows if r.provider == "fastvae-triton" and r.info["batch"] == 64)
    assert ratios[(small.setting, "fastvae-triton")]["compiled"] is None


def test_extra_memory_is_shown_in_largest_input_buffers():
    assert report.format_extra_memory({"peak_extra_bytes": None}) == "n/a"
    assert "(1.00 buf)" in report.format_extra_memory({"peak_extra_bytes": 400_000, "largest_input_bytes": 400_000})


def test_markdown_has_a_row_per_op_and_batch_and_a_column_per_provider(results):
    machine, rows, _ = report.load(results)
    text = report.markdown(machine, rows)
    header = text.splitlines()[0]
    assert "eager" in header and "compiled" in header and "fastvae-triton" in header
    assert any(line.startswith("| elbo_loss | 64 |") for line in text.splitlines())
    assert "| - |" in text  # compiled was not measured at batch 64


def test_target_verdict_names_what_a_fastvae_row_misses(results):
    _, rows, _ = report.load(results)
    target = next(t for t in report.TARGETS if t.op == "vae_loss")
    chosen = target.rows(rows)
    assert [r.provider for r in chosen] == ["eager", "compiled", "fastvae-triton"]
    ratios = report.speedups(rows)
    verdicts = [target.verdict(r, ratios[(r.setting, r.provider)]) for r in chosen]
    assert verdicts == ["", "", "missed: copy"]


def test_train_steps_table_gives_fastvae_over_plain_per_setting(results):
    _, _, steps = report.load(results)
    table = report.train_step_table(steps)
    assert table[0] == ("batch 128, eager, fp32", 1000.0, 1500.0, pytest.approx(1.5))
    assert table[1] == ("batch 128, torch.compile, AMP", 2000.0, None, None)  # fastvae not measured there
    assert "| batch 128, eager, fp32 | 1,000 | 1,500 | 1.50x |" in report.train_steps_markdown(steps)


def test_main_prints_tables_and_writes_the_plot(results, tmp_path, capsys):
    plot = tmp_path / "plot.png"
    report.main([str(results), "--plot", str(plot)])
    out = capsys.readouterr().out
    assert "elbo_loss — full" in out and "target, GPU" in out and "missed: copy" in out
    assert "training step" in out and "1.50x" in out
    assert plot.stat().st_size > 0


def test_a_run_of_one_target_case_reports_it_without_a_plot(tmp_path, capsys):
    """pytest -k selecting only the native target case: the verdict says which competitors
    were not run (rather than calling them missed), and no empty plot is drawn."""
    doc = {
        "machine_info": {"fastvae": {"device": "cuda", "device_name": "test GPU", "copy_gbps": 10.0}},
        "benchmarks": [_entry("fastvae-triton", 1e-4, op="vae_loss", latent=64)],
    }
    path = tmp_path / "one.json"
    path.write_text(json.dumps(doc))
    plot = tmp_path / "one.png"
    report.main([str(path), "--plot", str(plot)])
    out = capsys.readouterr().out
    assert "not run: eager, compiled" in out and "missed" not in out  # 1e6 B / 1e-4 s is 100% of copy
    assert "no plot" in out and not plot.exists()


def test_a_cpu_run_is_not_held_to_the_gpu_targets(results, tmp_path, capsys):
    doc = json.loads(results.read_text())
    doc["machine_info"]["fastvae"]["device"] = "cpu"
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(doc))
    report.main([str(path), "--plot", str(tmp_path / "cpu.png")])
    assert "target, GPU" not in capsys.readouterr().out


def test_compiled_cpu_crossover_measures_every_variant_and_restores_the_threshold():
    from benchmarks import compiled_cpu_crossover as crossover
    from fastvae.ops import common

    shipped = common.COMPILED_CPU_COMPOSITE_MAX_ELEMENTS
    results = crossover.measure(batch_size=4, amp=False, blocks=2, steps_per_block=1, quick=True)
    assert [r["variant"] for r in results] == list(crossover.VARIANTS)
    assert all(r["plain_ms"] > 0 and r["fastvae_ms"] > 0 and r["ratio_median"] > 0 for r in results), results
    assert shipped == common.COMPILED_CPU_COMPOSITE_MAX_ELEMENTS


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_step_anatomy_times_every_part_of_both_steps_through_their_own_guards(amp):
    from benchmarks import step_anatomy

    medians = step_anatomy.measure(amp=amp, batch_size=4, blocks=2, steps_per_block=1, quick=True)
    assert set(medians) == {"plain", "fastvae"}
    for provider, parts in medians.items():
        assert list(parts) == list(step_anatomy.PARTS)
        assert all(seconds > 0 for seconds in parts.values()), (provider, parts)


def test_the_gpu_run_measures_every_gpu_target_at_its_sizes():
    """The prepared GPU run's sweep is trimmed to fit its time: it must still hold each GPU target's
    op at batches the target covers, with both competitors to compare against."""
    cuda = torch.device("cuda")
    for target in (t for t in report.TARGETS if t.device == "cuda"):
        assert target.op in axes.GPU_TARGET_OPS
        spec = next(s for s in op_specs() if s.name == target.op)
        cases = [c for c in axes.cases(target.op, spec.axes, cuda, "gpu-run") if c.batch >= target.min_batch]
        assert {c.provider.name for c in cases} == {"eager", "compiled", "fastvae-triton"}, target.op
        assert len({c.batch for c in cases}) >= 2, f"{target.op}: one batch size only"


def test_the_gpu_tile_sweep_runs_its_kernel_with_every_tile_it_lists(capsys):
    """benchmarks/gpu/tile_sweep.py is run by hand on a GPU in a lease's spare minutes: its smoke
    mode (the interpreter, on the CPU) keeps it working."""
    from benchmarks.gpu import tile_sweep

    tile_sweep.main(["--smoke"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.strip() and line.split()[0].isdigit()]
    assert sorted((int(r[0]), int(r[1]), int(r[2])) for r in rows) == sorted(tile_sweep.configurations(True))
    assert all(float(r[3]) > 0 for r in rows)


def test_the_eager_paths_benchmark_runs_both_comparisons(capsys):
    """benchmarks.eager_paths measures the mechanisms design.md keeps by their savings: it must
    still reach the ops' current signatures and the hand-over it switches off."""
    from benchmarks import eager_paths

    eager_paths.main(["--batch", "8", "--repeats", "2"])
    out = capsys.readouterr().out
    assert out.count("route, ") == 2 and "hand-over, elbo_loss" in out, out


@needs_library
def test_the_sampler_in_step_benchmark_times_every_variant(capsys):
    """benchmarks.sampler_in_step (the eager sampler's in-step anatomy that docs/design.md quotes)
    reaches the op's routes and the native binding as they are now."""
    from benchmarks import sampler_in_step

    sampler_in_step.main(["--blocks", "2", "--steps", "1", "--batch", "4", "--warm-repeats", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert "public runs the " in lines[0], lines[0]
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == list(sampler_in_step.VARIANTS)
    assert all(
        float(value.removesuffix("us").removesuffix("ms").removesuffix("x")) > 0 for r in rows for value in r[1:]
    )


@without_a_gpu
def test_the_triton_launch_cost_benchmark_times_every_launcher():
    """benchmarks.triton_launch_cost (the GPU path's host time, measured without a GPU) runs in a
    process without the interpreter; its smoke run keeps it working."""
    result = run_without_interpreter(["-m", "benchmarks.triton_launch_cost", "--calls", "20"], timeout=300)
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[-1:] and line[:1].isalpha()]
    timed = {" ".join(r[:-3]): [float(v) for v in r[-3:]] for r in rows if len(r) > 3 and r[-1][-1].isdigit()}
    assert set(timed) == {
        "reparameterize_kl forward",
        "reparameterize_kl backward",
        "gaussian_kl forward",
        "bernoulli forward",
    }, result.stdout
    assert all(total > 0 and dispatch > 0 for total, dispatch, _ in timed.values()), result.stdout


@pytest.mark.parametrize(
    "argv",
    [["--cuda-composite", "--device", "cpu", "--compile", "default"], ["--cuda-composite", "--compile", "eager"]],
    ids=["cpu", "eager"],
)
def test_train_ab_refuses_the_cuda_composite_where_it_means_nothing(argv, capsys):
    """train_ab --cuda-composite changes what compiled CUDA graphs hold (the prepared GPU run's
    composite A/B): on the CPU or without a compile mode it is refused before anything is
    measured, naming what it needs."""
    from benchmarks import train_ab

    with pytest.raises(SystemExit):
        train_ab.main(argv)
    assert "--cuda-composite" in capsys.readouterr().err


def test_global_accesses_counts_each_width_of_load_and_store():
    from benchmarks.triton_resources import global_accesses

    ptx = """
        ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];
        ld.global.v4.b32 {%r5, %r6, %r7, %r8}, [%rd2];
        ld.global.nc.b64 %rd3, [%rd4];
        ld.global.v2.b32 {%r9, %r10}, [%rd5];
        st.global.v2.b64 [%rd6], {%fd1, %fd2};
        st.global.b32 [%rd7], %r11;
        ld.shared.v4.b32 {%r12, %r13, %r14, %r15}, [%r16];
    """
    assert global_accesses(ptx) == {"loads": {16: 2, 8: 2}, "stores": {16: 1, 4: 1}}
