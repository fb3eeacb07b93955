"""fastvae-train's likelihoods and objectives: --likelihood, --objective iwae (--samples, --estimator),
--time-limit, and checkpoints from before these flags existed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import fastvae
from fastvae.functional import DREG_COMPILE_MIN_TORCH, _torch_version
from fastvae.train import checkpoint as ckpt
from fastvae.train.cli import run_training
from fastvae.train.config import TrainConfig, parse_config
from fastvae.train.eval_cli import main as eval_main
from fastvae.train.evaluate import DENSITY_NOTE, GREY_BERNOULLI_NOTE
from fastvae.train.models import VAEConfig, build_model
from fastvae.train.plots import PICTURE_FILES
from fastvae.train.trainer import ELBOObjective, IWAEObjective

from app_helpers import SIDE, expect_exit, final_state, tiny_args, tiny_dataset

# (--likelihood, the --binarize it is meant for)
LIKELIHOOD_RUNS = [("bernoulli", "dynamic"), ("continuous-bernoulli", "none"), ("gaussian", "none")]
OBJECTIVE_RUNS = {
    "elbo": (),
    "iwae": ("--objective", "iwae", "--samples", "3"),
    "dreg": ("--objective", "iwae", "--samples", "3", "--estimator", "dreg"),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("idx"))


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- flags
def test_defaults_follow_binarize_and_the_objective():
    assert parse_config([]).likelihood == "bernoulli"
    assert parse_config(["--binarize", "static"]).likelihood == "bernoulli"
    assert parse_config(["--binarize", "none"]).likelihood == "continuous-bernoulli"
    assert parse_config(["--binarize", "none", "--likelihood", "bernoulli"]).likelihood == "bernoulli"
    elbo, iwae = parse_config([]), parse_config(["--objective", "iwae"])
    assert (elbo.objective, elbo.samples, elbo.estimator) == ("elbo", 1, None)
    assert (iwae.objective, iwae.samples, iwae.estimator) == ("iwae", 5, "iwae")
    assert TrainConfig(likelihood="continuous-bernoulli").model_config((1, 8, 8)).likelihood == "continuous_bernoulli"


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (
            ("--samples", "4"),
            ("--samples 4 is the number of importance samples of --objective iwae", "Pass --objective iwae"),
        ),
        (
            ("--estimator", "dreg"),
            (
                "--estimator dreg picks the gradient estimator of the importance-weighted bound",
                "pass --objective iwae with it, or drop --estimator",
            ),
        ),
        (
            ("--objective", "iwae", "--beta", "0.5"),
            ("--beta 0.5 weights the ELBO's KL term", "(--objective iwae) has no separate KL term", "drop --beta"),
        ),
        (
            ("--objective", "iwae", "--kl-warmup", "10"),
            ("--kl-warmup 10 anneals the ELBO's KL term", "drop --kl-warmup"),
        ),
        (
            ("--objective", "iwae", "--free-bits", "0.5"),
            ("--free-bits 0.5 floors the ELBO's KL term", "drop --free-bits", "use --objective elbo"),
        ),
        (("--objective", "iwae", "--samples", "0"), ("--samples must be >= 1, got 0",)),
        (("--time-limit", "-5"), ("--time-limit must be >= 0, got -5",)),
        (("--time-limit", "nan"), ("--time-limit must be a finite number, got nan",)),
    ],
    ids=["samples-elbo", "estimator-elbo", "beta", "kl-warmup", "free-bits", "samples-0", "time-negative", "time-nan"],
)
def test_combinations_that_cannot_run_are_refused(dataset, tmp_path, flags, fragments):
    out = tmp_path / "r"
    expect_exit(tiny_args(dataset, out, *flags), *fragments)
    assert not out.exists()


def test_unknown_choices_are_refused_by_the_parser(dataset, tmp_path, capsys):
    for flag, value in (("--likelihood", "continuous_bernoulli"), ("--objective", "vae"), ("--estimator", "x")):
        with pytest.raises(SystemExit):
            parse_config([flag, value])
        assert f"argument {flag}: invalid choice: '{value}'" in capsys.readouterr().err


# --------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("objective", list(OBJECTIVE_RUNS))
@pytest.mark.parametrize("likelihood, binarize", LIKELIHOOD_RUNS, ids=[name for name, _ in LIKELIHOOD_RUNS])
def test_each_likelihood_and_objective_trains_end_to_end(dataset, tmp_path, likelihood, binarize, objective):
    out = tmp_path / "run"
    args = tiny_args(
        dataset,
        out,
        "--epochs",
        "1",
        "--lr",
        "1e-2",
        "--likelihood",
        likelihood,
        "--binarize",
        binarize,
        *OBJECTIVE_RUNS[objective],
    )
    test = run_training([a for a in args if a != "--no-plots"])
    assert set(PICTURE_FILES) <= {p.name for p in out.iterdir()}
    (row,) = metric_rows(out)
    trained_on = "train_neg_elbo" if objective == "elbo" else "train_neg_iw_bound"
    other = "train_neg_iw_bound" if objective == "elbo" else "train_neg_elbo"
    assert math.isfinite(row[trained_on]) and other not in row, row
    assert row["objective"] == ("elbo" if objective == "elbo" else "iwae")
    for key in ("val_neg_elbo", "val_recon", "val_kl"):  # validation is the one-sample -ELBO for every objective
        assert math.isfinite(row[key]), key
    for key in ("test_neg_elbo", "test_recon", "test_kl", "test_nll", "test_nll_stderr"):
        assert math.isfinite(test[key]), key
    library_name = likelihood.replace("-", "_")
    assert test["likelihood"] == library_name
    assert test.get("nll_note") == (None if likelihood == "bernoulli" else DENSITY_NOTE)
    config = json.loads((out / "config.json").read_text())
    assert config["likelihood"] == likelihood and config["model_config"]["likelihood"] == library_name
    model = final_state(out)["model"]
    if likelihood == "gaussian":  # the per-pixel variance is learned
        assert model["decoder_logvar"].shape == (1, SIDE, SIDE) and model["decoder_logvar"].abs().max() > 0
    else:
        assert "decoder_logvar" not in model
    if objective != "elbo":
        assert row["samples"] == 3 and row["estimator"] == ("dreg" if objective == "dreg" else "iwae")


def test_a_resumed_run_may_switch_the_objective(dataset, tmp_path):
    """--samples and --estimator belong to the objective: switching it starts them from its defaults. The
    learning curves then show the -ELBO and the -IW bound, each over the epochs trained on it."""
    out = tmp_path / "run"
    run_training([a for a in tiny_args(dataset, out, "--epochs", "1", "--iw-samples", "0") if a != "--no-plots"])
    run_training(["--resume", str(out), "--epochs", "2", "--objective", "iwae", "--estimator", "dreg"])
    assert json.loads((out / "config.json").read_text())["samples"] == 5
    run_training(["--resume", str(out), "--epochs", "3", "--objective", "elbo"])
    config = json.loads((out / "config.json").read_text())
    assert (config["objective"], config["samples"], config["estimator"]) == ("elbo", 1, None)
    rows = metric_rows(out)
    assert ["train_neg_elbo" in r for r in rows] == [True, False, True]
    assert rows[1]["train_neg_iw_bound"] > 0 and (rows[1]["samples"], rows[1]["estimator"]) == (5, "dreg")


def test_a_resumed_run_may_not_change_the_likelihood(dataset, tmp_path):
    out = tmp_path / "run"
    run_training(tiny_args(dataset, out, "--epochs", "1", "--iw-samples", "0", "--binarize", "none"))
    expect_exit(
        ["--resume", str(out), "--epochs", "2", "--likelihood", "gaussian"],
        "another model config",
        "likelihood: checkpoint 'continuous-bernoulli', this run 'gaussian'",
    )


def _as_written_before_the_likelihood_flags(run_dir: Path) -> None:
    """Rewrite the run's checkpoints as fastvae-train wrote them before --likelihood, --objective, --samples,
    --estimator and --time-limit existed: none of them in the configs, sealed again."""
    for name in (ckpt.LAST, ckpt.BEST):
        path = ckpt.checkpoint_path(run_dir, name)
        state = ckpt.load_checkpoint(path)
        for key in ("likelihood", "objective", "samples", "estimator", "time_limit"):
            del state["config"][key]
        del state["model_config"]["likelihood"]
        ckpt.save_checkpoint(state, path)


def test_checkpoints_from_before_the_likelihood_flag_are_bernoulli_vaes(dataset, tmp_path, capsys):
    """Every run then trained a Bernoulli decoder, under --binarize none too (where the default is now
    continuous-bernoulli): fastvae-eval evaluates it as one, and a resume continues it as one."""
    out = tmp_path / "run"
    run_training(
        tiny_args(dataset, out, "--epochs", "1", "--iw-samples", "0", "--binarize", "none", "--likelihood", "bernoulli")
    )
    _as_written_before_the_likelihood_flags(out)
    eval_main([str(out), "--iw-samples", "4"])
    result = json.loads((out / "eval-best.json").read_text())
    assert result["likelihood"] == "bernoulli" and result["nll_note"] == GREY_BERNOULLI_NOTE
    assert math.isfinite(result["test_nll"])
    run_training(["--resume", str(out), "--epochs", "2"])
    config = json.loads((out / "config.json").read_text())
    assert (config["likelihood"], config["objective"], config["samples"]) == ("bernoulli", "elbo", 1)
    assert final_state(out)["step"] == 10


def test_time_limit_stops_training_then_validates_saves_and_evaluates(dataset, tmp_path, capsys):
    """The clock is read at the log points (every --log-every 2 steps here): a limit that is spent at
    once stops after step 2 of the 15 that --epochs 3 asks for; a resume gets a budget of its own."""
    out = tmp_path / "run"
    test = run_training(tiny_args(dataset, out, "--epochs", "3", "--time-limit", "1e-6"))
    assert "--time-limit 1e-06 s reached at step 2: training stopped" in capsys.readouterr().out
    state = final_state(out)
    assert state["step"] == 2 and state["best_step"] == 2
    (row,) = metric_rows(out)
    assert not row["epoch_complete"] and math.isfinite(row["val_neg_elbo"])
    assert json.loads((out / "test_metrics.json").read_text())["test_nll"] == test["test_nll"]
    run_training(["--resume", str(out), "--time-limit", "0"])
    assert final_state(out)["step"] == 15


# --------------------------------------------------------------------------- the objectives' formulas
def _tiny_model(likelihood: str):
    torch.manual_seed(0)
    model = build_model(VAEConfig(image_shape=(1, SIDE, SIDE), latent_dim=3, hidden_dims=(8,), likelihood=likelihood))
    if model.decoder_logvar is not None:
        with torch.no_grad():
            model.decoder_logvar.uniform_(-1.0, 0.5)
    x = torch.rand(5, 1, SIDE, SIDE)
    return model, (x.round() if likelihood == "bernoulli" else x)


def _log_lik(model, decoded: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x|z) per element by formula, in float64."""
    decoded, x = decoded.double(), x.double()
    if model.likelihood == "gaussian":
        logvar = model.decoder_logvar.double()
        return -0.5 * ((x - decoded) ** 2 / logvar.exp() + logvar + math.log(2 * math.pi))
    log_p = x * decoded - torch.nn.functional.softplus(decoded)
    if model.likelihood == "continuous_bernoulli":
        log_p = log_p + torch.log(decoded / torch.tanh(decoded / 2))  # |logits| > 1e-3 in these tests
    return log_p


LIBRARY_LIKELIHOODS = ["bernoulli", "continuous_bernoulli", "gaussian"]


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
@pytest.mark.parametrize("likelihood", LIBRARY_LIKELIHOODS)
def test_elbo_objective_uses_the_model_likelihood(likelihood, traced):
    model, x = _tiny_model(likelihood)
    objective = ELBOObjective(model, 0.0)
    if traced:  # what --compile runs, without inductor's minute of compiling
        torch._dynamo.reset()
        objective = torch.compile(objective, backend="aot_eager", fullgraph=True)
    state = torch.get_rng_state()
    loss, stats = objective(x, torch.tensor(0.3))
    torch.set_rng_state(state)
    decoded, mu, logvar, _ = model(x)
    recon = -_log_lik(model, decoded, x).sum()
    kl = 0.5 * (mu.double() ** 2 + logvar.double().exp() - logvar.double() - 1).sum()
    torch.testing.assert_close(loss.double(), (recon + 0.3 * kl) / 5, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats.double(), torch.stack([recon + kl, recon, kl]), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
@pytest.mark.parametrize("likelihood", LIBRARY_LIKELIHOODS)
def test_iwae_objective_is_the_bound_and_trains_every_parameter(likelihood, estimator, traced):
    """The loss is -(logsumexp_k log w_k - log K), written out in float64 on the same samples; backward
    reaches the encoder, the decoder and (Gaussian) the decoder's log-variance."""
    model, x = _tiny_model(likelihood)
    objective = IWAEObjective(model, samples=4, estimator=estimator)
    if traced:
        torch._dynamo.reset()
        # fastvae-train compiles without fullgraph; with it, DReG needs torch >= 2.14 (iwae_loss says
        # so), and without it an older dynamo breaks the graph at the bound and runs it eagerly.
        fullgraph = not (estimator == "dreg" and _torch_version() < DREG_COMPILE_MIN_TORCH)
        objective = torch.compile(objective, backend="aot_eager", fullgraph=fullgraph)
    state = torch.get_rng_state()
    loss, stats = objective(x, torch.tensor(1.0))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    torch.set_rng_state(state)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        z = fastvae.reparameterize(mu, logvar, samples=4)
        decoded = model.decode(z.flatten(0, 1)).unflatten(0, (4, 5))  # independent of decode's own reshaping
        mu, logvar, z = mu.double(), logvar.double(), z.double()
        log_w = (
            _log_lik(model, decoded, x).flatten(2).sum(2)
            - 0.5 * (z**2).sum(2)
            + 0.5 * ((z - mu) ** 2 / logvar.exp() + logvar).sum(2)
        )  # the log 2pi terms cancel
        bound = torch.logsumexp(log_w, dim=0) - math.log(4)
    torch.testing.assert_close(loss.double(), -bound.mean(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats.double(), -bound.sum().reshape(1), rtol=1e-5, atol=1e-3)
