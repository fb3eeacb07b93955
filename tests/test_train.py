"""fastvae-train end to end on a tiny generated dataset: outputs, resume equivalence, DDP, bad input."""

from __future__ import annotations

import json
import math
import os
import re
import socket
from pathlib import Path

import PIL.Image
import pytest
import torch
import torch.multiprocessing as mp

from fastvae.train import checkpoint as ckpt
from fastvae.train import data, trainer
from fastvae.train.cli import main, run_training
from fastvae.train.config import TrainConfig
from fastvae.train.eval_cli import main as eval_main
from fastvae.train.evaluate import elbo_rows, evaluate_elbo
from fastvae.train.models import VAEConfig, build_model
from fastvae.train.trainer import ELBOObjective, kl_weight_at

from app_helpers import SIDE, TEST_N, VAL_N, expect_exit, final_state, tiny_args, tiny_dataset
from helpers import RecordPointwiseSizes


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("idx"))


def assert_same_training(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], b["optimizer"]["state"][key]["exp_avg_sq"])
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


def test_end_to_end_writes_the_run_folder(dataset, tmp_path):
    out = tmp_path / "run"
    # lr 1e-2: ten steps at the default 1e-3 move the loss less than the sampling noise does.
    args = tiny_args(dataset, out, "--epochs", "2", "--lr", "1e-2", "--kl-warmup", "4", "--free-bits", "0.1")
    test = run_training([a for a in args if a != "--no-plots"])
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "metrics.jsonl", "last.pt", "best.pt", "test_metrics.json"} <= names
    assert {
        "reconstructions.png",
        "samples.png",
        "learning_curves.png",
        "latent_scatter.png",
        "manifold.png",
        "latent_evolution.gif",
    } <= names
    with PIL.Image.open(out / "latent_evolution.gif") as gif:
        assert gif.n_frames == 2  # one per epoch
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["epoch_complete"] for r in rows)
    for key in (
        "train_neg_elbo",
        "train_kl",
        "train_recon",
        "val_neg_elbo",
        "val_kl",
        "val_recon",
        "samples_per_s",
        "seconds",
    ):
        assert all(r[key] == r[key] and r[key] >= 0 for r in rows), key
    assert rows[-1]["train_neg_elbo"] < rows[0]["train_neg_elbo"]
    saved = json.loads((out / "test_metrics.json").read_text())
    assert saved["test_nll"] == test["test_nll"] and saved["test_neg_elbo"] == test["test_neg_elbo"]
    assert saved["iw_examples"] == 10 and saved["test_examples"] == TEST_N
    config = json.loads((out / "config.json").read_text())
    assert config["model_config"]["image_shape"] == [1, SIDE, SIDE] and config["world_size"] == 1


def test_fastvae_eval_on_the_run(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    run_training(tiny_args(dataset, out, "--epochs", "1", "--arch", "conv", "--conv-channels", "4,8"))
    eval_main([str(out), "--iw-samples", "8", "--batch-size", "8"])
    result = json.loads((out / "eval-best.json").read_text())
    assert result["iw_samples"] == 8 and result["iw_examples"] == TEST_N
    assert "test_nll" in capsys.readouterr().out


@pytest.mark.parametrize("split_at", [("--epochs", "1"), ("--max-steps", "3")], ids=["epoch-end", "mid-epoch"])
def test_resume_continues_to_the_same_result(dataset, tmp_path, split_at):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_training(tiny_args(dataset, straight, "--epochs", "2"))
    run_training(tiny_args(dataset, resumed, "--epochs", "2", *split_at))
    first = final_state(resumed)
    assert first["step"] < 10
    run_training(["--resume", str(resumed), "--epochs", "2", "--max-steps", "0"])
    assert_same_training(final_state(straight), final_state(resumed))


def _gloo_threads() -> list[str]:
    """The names of this process's gloo threads (Linux names them gloo_tcp_loop, pt_gloo_runloop)."""
    tasks = Path("/proc/self/task")
    names = ((tasks / thread / "comm").read_text().strip() for thread in os.listdir(tasks))
    return [name for name in names if "gloo" in name]


def _ddp_worker(rank: int, world: int, port: int, args: list[str]) -> None:
    """One rank, as torchrun starts it: the environment, then the CLI's main()."""
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
        }
    )
    torch.set_num_threads(1)
    main(args)
    # A gloo thread still running when Python shuts down can abort the process (distributed.teardown).
    assert not _gloo_threads(), f"rank {rank}: the process group outlived the run: {_gloo_threads()}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_with_two_gloo_processes(dataset, tmp_path):
    out = tmp_path / "ddp"
    args = tiny_args(dataset, out, "--epochs", "2", "--device", "cpu")
    mp.spawn(_ddp_worker, args=(2, _free_port(), args), nprocs=2, join=True)
    state = final_state(out)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["step"] == 2 * 3  # each rank takes ceil(ceil(80 / 2) / 16) = 3 steps per epoch
    test = json.loads((out / "test_metrics.json").read_text())
    # The KL needs no noise, so the value reduced over two ranks must equal one process's.
    model = build_model(VAEConfig(**state["model_config"]))
    model.load_state_dict(ckpt.load_checkpoint(out / "best.pt")["model"])
    test_split = data.prepare_targets(data.load_datasets(str(dataset), None, VAL_N, 0).test, "dynamic", "test")
    single = evaluate_elbo(model, test_split, 8, torch.device("cpu"), seed=0)
    assert test["test_kl"] == pytest.approx(single["kl"], rel=1e-5)


# --------------------------------------------------------------------------- the objective
def test_kl_warmup_is_linear_to_beta():
    config = TrainConfig(beta=2.0, kl_warmup=4)
    assert [kl_weight_at(config, s) for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert kl_weight_at(TrainConfig(beta=0.5), 0) == 0.5


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
@pytest.mark.parametrize("free_bits", [0.0, 0.7])
def test_objective_matches_the_formula(free_bits, traced):
    """Eager and traced (what --compile runs), with and without free bits, the objective
    must be the formula, and its statistics the sums of the two terms."""
    torch.manual_seed(0)
    model = build_model(VAEConfig(image_shape=(1, SIDE, SIDE), latent_dim=3, hidden_dims=(8,)))
    x = (torch.rand(5, 1, SIDE, SIDE) < 0.5).float()
    weight = torch.tensor(0.3)
    state = torch.get_rng_state()
    objective = ELBOObjective(model, free_bits)
    if traced:
        torch._dynamo.reset()
        objective = torch.compile(objective, backend="aot_eager", fullgraph=True)
    loss, stats = objective(x, weight)
    torch.set_rng_state(state)
    logits, mu, logvar, kl = model(x)
    recon = torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    kl_dims = 0.5 * (mu**2 + logvar.exp() - logvar - 1)
    kl_term = kl_dims.mean(0).clamp_min(free_bits).sum() if free_bits else kl_dims.sum(1).mean()
    torch.testing.assert_close(loss, recon / 5 + 0.3 * kl_term, rtol=1e-5, atol=1e-4)
    expected_stats = torch.stack([recon + kl.sum(), recon, kl.sum()]).detach()  # -ELBO, recon, KL
    torch.testing.assert_close(stats, expected_stats, rtol=1e-5, atol=1e-4)


def test_objective_gradient_matches_the_formula_without_a_pass_over_the_data():
    """The objective's Bernoulli kernel writes d(loss)/d(logits) in the forward pass: the model's
    gradients must match the unfused formula's, and backward must run no pointwise op over the
    [B, C, H, W] logits (no scaling of the saved gradient)."""
    torch.manual_seed(1)
    model = build_model(VAEConfig(image_shape=(1, SIDE, SIDE), latent_dim=3, hidden_dims=(8,)))
    x = (torch.rand(6, 1, SIDE, SIDE) < 0.5).float()
    weight = torch.tensor(0.3)
    state = torch.get_rng_state()
    loss, _ = ELBOObjective(model, 0.0)(x, weight)
    with RecordPointwiseSizes() as recorder:
        grads = torch.autograd.grad(loss, list(model.parameters()))
    sizes = recorder.sizes
    torch.set_rng_state(state)
    logits, mu, logvar, _ = model(x)
    recon = torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    kl = 0.5 * (mu**2 + logvar.exp() - logvar - 1).sum()
    expected = torch.autograd.grad(recon / 6 + 0.3 * kl / 6, list(model.parameters()))
    for (name, _), got, want in zip(model.named_parameters(), grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert sizes, "the recorder saw no pointwise op at all"
    assert x.numel() not in sizes, "backward ran a pointwise op over the logits (scaling the saved gradient)"


# --------------------------------------------------------------------------- bad input
def test_unknown_dataset(tmp_path):
    expect_exit(["--dataset", "cifar10", "--out", str(tmp_path / "r")], "unknown dataset 'cifar10'")


def test_unreadable_data_names_the_file(dataset, tmp_path):
    broken = tiny_dataset(tmp_path / "broken")
    path = broken / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    expect_exit(tiny_args(broken, tmp_path / "r"), str(path), "truncated or corrupt")


def test_fp16_amp_on_cpu(dataset, tmp_path):
    expect_exit(
        tiny_args(dataset, tmp_path / "r", "--amp", "--amp-dtype", "fp16", "--device", "cpu"),
        "--amp-dtype fp16 needs a CUDA device",
        "bf16",
    )


def test_compile_mode_needs_compile_and_reduce_overhead_a_gpu(dataset, tmp_path):
    out = tmp_path / "r"
    expect_exit(tiny_args(dataset, out, "--compile-mode", "reduce-overhead"), "add --compile")
    expect_exit(
        tiny_args(dataset, out, "--compile", "--compile-mode", "reduce-overhead", "--device", "cpu"),
        "--compile-mode reduce-overhead records CUDA graphs, and this run is on cpu",
    )
    assert not out.exists()


def test_bad_flag_values(dataset, tmp_path):
    expect_exit(tiny_args(dataset, tmp_path / "r", "--epochs", "0"), "--epochs must be >= 1")
    expect_exit(tiny_args(dataset, tmp_path / "r", "--hidden-dims", "a"), "--hidden-dims takes")


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--lr", "nan", "--lr must be a finite number, got nan"),
        ("--lr", "inf", "--lr must be a finite number, got inf"),
        ("--lr", "0", "--lr must be > 0, got 0"),
        ("--beta", "nan", "--beta must be a finite number, got nan"),
        ("--beta", "inf", "--beta must be a finite number, got inf"),
        ("--free-bits", "nan", "--free-bits must be a finite number, got nan"),
        ("--free-bits", "inf", "--free-bits must be a finite number, got inf"),
        ("--free-bits", "-0.5", "--free-bits must be >= 0, got -0.5"),
        ("--seed", str(2**70), f"--seed must be between 0 and 2**63 - 1 (torch takes 64-bit seeds), got {2**70}"),
        ("--seed", "-1", "--seed must be between 0 and 2**63 - 1"),
    ],
    ids=lambda v: v if len(v) < 12 else v[:12],
)
def test_numbers_are_checked_when_the_flags_are_read(dataset, tmp_path, flag, value, message):
    out = tmp_path / "r"
    expect_exit(tiny_args(dataset, out, flag, value), message)
    assert not out.exists()  # refused before anything was written


def test_val_size_too_large_names_the_flag(dataset, tmp_path):
    expect_exit(
        tiny_args(dataset, tmp_path / "r", "--val-size", "500"),
        "--val-size 500",
        "96 training images",
        "pass a smaller --val-size",
    )


def test_an_unavailable_backend_is_refused_before_anything_is_written(dataset, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("triton can run here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # what a CPU machine without the interpreter has
    out = tmp_path / "r"
    expect_exit(
        tiny_args(dataset, out, "--backend", "triton", "--device", "cpu"),
        "--backend triton cannot run on cpu",
        "TRITON_INTERPRET=1",
    )
    assert not out.exists()


def test_a_resume_at_max_steps_trains_nothing(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    run_training(tiny_args(dataset, out, "--epochs", "2", "--max-steps", "3", "--iw-samples", "0"))
    last, metrics = (out / "last.pt").read_bytes(), (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    for _ in range(2):
        run_training(["--resume", str(out)])
        assert "already at --max-steps 3 (step 3): nothing to train" in capsys.readouterr().out
    assert (out / "last.pt").read_bytes() == last and (out / "metrics.jsonl").read_text() == metrics
    assert json.loads((out / "test_metrics.json").read_text())["best_step"] == 3


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(one_epoch_run):
    saved = {name: (one_epoch_run / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.jsonl")}
    # Adam moves every weight by about --lr per step: 1e30 overflows float32 in the next forward pass.
    resume = ["--resume", str(one_epoch_run), "--epochs", "2", "--lr", "1e30", "--log-every", "1"]
    message = expect_exit(
        resume,
        "the training loss became non-finite",
        "training stopped",
        "Try a lower --lr (this run: 1e+30)",
        f"{one_epoch_run / 'last.pt'} (step 5) is the last good checkpoint and is kept",
        f"fastvae-train --resume {one_epoch_run} --lr 1e+29",
    )
    assert re.search(r"non-finite \(.*\) at step [67]\b", message), message
    assert {name: (one_epoch_run / name).read_bytes() for name in saved} == saved


def test_steps_a_grad_scaler_skips_are_not_failures(dataset, tmp_path, monkeypatch):
    """fp16's GradScaler skips steps whose gradients overflow; their losses are finite, and the run goes
    on. fp16 needs CUDA, so a CPU scaler and two gradients made infinite by a hook stand in for it."""
    real_scaler, real_build = torch.amp.GradScaler, trainer.build_model
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: real_scaler(device, enabled=True))
    overflowed = []

    def overflow_twice(grad):
        if len(overflowed) < 2:
            overflowed.append(1)
            return grad * math.inf
        return grad

    def build_model(config):
        model = real_build(config)
        next(model.parameters()).register_hook(overflow_twice)
        return model

    monkeypatch.setattr(trainer, "build_model", build_model)
    out = tmp_path / "run"
    run_training(tiny_args(dataset, out, "--epochs", "1", "--log-every", "1", "--iw-samples", "0"))
    state = final_state(out)
    assert state["step"] == 5 and state["scaler"]["scale"] == 2.0**16 / 4  # two steps skipped, three taken
    assert all(torch.isfinite(weights).all() for weights in state["model"].values())


def test_a_run_diverging_before_its_first_checkpoint(dataset, tmp_path):
    out = tmp_path / "run"
    expect_exit(
        tiny_args(dataset, out, "--epochs", "1", "--lr", "1e30"),
        "became non-finite",
        "no checkpoint was written yet; start again with a lower --lr (e.g. 1e+29)",
    )
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()


@pytest.fixture()
def one_epoch_run(dataset, tmp_path) -> Path:
    out = tmp_path / "run"
    run_training(tiny_args(dataset, out, "--epochs", "1", "--iw-samples", "0"))
    return out


def test_checkpoint_from_another_config(one_epoch_run):
    expect_exit(
        ["--resume", str(one_epoch_run), "--epochs", "2", "--latent-dim", "3"],
        "another model config",
        "latent_dim: checkpoint 2, this run 3",
    )


def test_truncated_checkpoint(one_epoch_run):
    last = one_epoch_run / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    expect_exit(["--resume", str(one_epoch_run), "--epochs", "2"], str(last), "truncated or corrupt")
    expect_exit([str(last)], str(last), "truncated or corrupt", entry=eval_main, prog="fastvae-eval")


def test_eval_rows_are_per_datapoint():
    model = build_model(VAEConfig(image_shape=(1, SIDE, SIDE), latent_dim=2, hidden_dims=(8,)))
    recon, kl = elbo_rows(model, torch.rand(3, 1, SIDE, SIDE).round(), torch.Generator().manual_seed(0))
    assert recon.shape == kl.shape == (3,) and (recon > 0).all() and (kl >= 0).all()


def test_torchrun_with_one_process_takes_the_process_group_path(dataset, tmp_path):
    """torchrun --nproc-per-node 1 joins a process group and trains through DDP (gloo here, NCCL on
    a GPU: tests/test_cuda.py), the path several processes take."""
    import subprocess
    import sys

    out = tmp_path / "one"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "1",
            "-m",
            "fastvae.train",
            *tiny_args(dataset, out, "--epochs", "1", "--device", "cpu"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["distributed_backend"] == "gloo" and config["world_size"] == 1
    assert final_state(out)["world_size"] == 1
