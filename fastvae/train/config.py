"""The fastvae-train configuration: one dataclass, the argparse flags that fill it, and checks.

The parser is built only inside `build_parser()` (called from main()), never at import.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from fastvae.backend import BACKEND_CHOICES
from fastvae.train.checkpoint import load_checkpoint, resolve_checkpoint
from fastvae.train.data import BINARIZE_CHOICES, KNOWN_DATASETS
from fastvae.train.models import ARCHS, VAEConfig, parse_widths

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_CHOICES = ("auto", "cpu", "cuda")
# Evaluation defaults, shared by fastvae-train and fastvae-eval.
DEFAULT_IW_SAMPLES = 1000
DEFAULT_IW_BATCH_SIZE = 16384
DEFAULT_EVAL_BATCH_SIZE = 500
# --likelihood's spelling -> the library's (fastvae.ops.likelihoods.LIKELIHOODS); flags use hyphens.
LIKELIHOODS = {"bernoulli": "bernoulli", "continuous-bernoulli": "continuous_bernoulli", "gaussian": "gaussian"}
OBJECTIVES = ("elbo", "iwae")
ESTIMATORS = ("iwae", "dreg")
# torch.compile's modes for --compile: reduce-overhead records CUDA graphs, which replay a step
# that is bound by the host issuing its kernels (a small VAE's step on a GPU).
COMPILE_MODES = ("default", "reduce-overhead")
DEFAULT_IWAE_SAMPLES = 5
# Flags that fix parameter shapes: a resumed run may not change them (a Gaussian decoder owns a log-variance).
MODEL_FIELDS = ("arch", "latent_dim", "hidden_dims", "conv_channels", "likelihood")
# What the config of a checkpoint written before a flag existed implies: every run then was a Bernoulli VAE.
LEGACY_VALUES = {"likelihood": "bernoulli", "objective": "elbo", "samples": 1, "estimator": None}
# Flags about this invocation, never taken from the config of the run being resumed.
INVOCATION_FIELDS = ("out", "resume", "overwrite")
# Seeds are 64-bit in torch; the epoch is added to the seed for the batch order, so stay below 2**63.
SEED_LIMIT = 2**63


@dataclass
class TrainConfig:
    # data
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    binarize: str = "dynamic"
    val_size: int = 5000
    # model
    arch: str = "mlp"
    latent_dim: int = 32
    hidden_dims: str = "512,256"
    conv_channels: str = "32,64"
    # None: continuous-bernoulli with --binarize none (grey levels), else bernoulli; resolved when built.
    likelihood: str | None = None
    # optimization
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    beta: float = 1.0
    kl_warmup: int = 0
    free_bits: float = 0.0
    max_steps: int = 0
    time_limit: float = 0.0
    objective: str = "elbo"
    samples: int | None = None  # None: 1 for elbo, DEFAULT_IWAE_SAMPLES for iwae; resolved when built
    estimator: str | None = None  # None: iwae for --objective iwae; elbo has none
    # execution
    amp: bool = False
    amp_dtype: str = "bf16"
    compile: bool = False
    compile_mode: str = "default"
    device: str = "auto"
    backend: str = "auto"
    # outputs and evaluation
    out: str | None = None
    resume: str | None = None
    overwrite: bool = False
    iw_samples: int = DEFAULT_IW_SAMPLES
    iw_examples: int = 1000
    iw_batch_size: int = DEFAULT_IW_BATCH_SIZE
    eval_batch_size: int = DEFAULT_EVAL_BATCH_SIZE
    log_every: int = 20
    plots: bool = True

    def __post_init__(self) -> None:
        """Resolve the defaults that depend on other flags, so that the config (and every checkpoint
        and config.json written from it) records what the run used."""
        if self.likelihood is None:
            self.likelihood = "continuous-bernoulli" if self.binarize == "none" else "bernoulli"
        if self.samples is None:
            self.samples = DEFAULT_IWAE_SAMPLES if self.objective == "iwae" else 1
        if self.estimator is None and self.objective == "iwae":
            self.estimator = "iwae"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in with_legacy_values(values).items() if key in known})

    def model_config(self, image_shape: tuple[int, int, int]) -> VAEConfig:
        return VAEConfig(
            arch=self.arch,
            image_shape=image_shape,
            latent_dim=self.latent_dim,
            hidden_dims=parse_widths(self.hidden_dims, "--hidden-dims"),
            conv_channels=parse_widths(self.conv_channels, "--conv-channels"),
            likelihood=LIKELIHOODS[self.likelihood],
        )

    def validate(self) -> None:
        """Raise ValueError naming the flag and the fix for any value or combination that cannot run."""
        for flag, value in {
            "--epochs": self.epochs,
            "--batch-size": self.batch_size,
            "--latent-dim": self.latent_dim,
            "--val-size": self.val_size,
            "--iw-batch-size": self.iw_batch_size,
            "--eval-batch-size": self.eval_batch_size,
            "--log-every": self.log_every,
        }.items():
            require_at_least(flag, value, 1)
        for flag, value in {
            "--max-steps": self.max_steps,
            "--kl-warmup": self.kl_warmup,
            "--iw-samples": self.iw_samples,
            "--iw-examples": self.iw_examples,
        }.items():
            require_at_least(flag, value, 0)
        require_finite("--lr", self.lr, above=0.0)
        require_finite("--beta", self.beta, at_least=0.0)
        require_finite("--free-bits", self.free_bits, at_least=0.0)
        require_finite("--time-limit", self.time_limit, at_least=0.0)
        require_seed("--seed", self.seed)
        parse_widths(self.hidden_dims, "--hidden-dims")
        parse_widths(self.conv_channels, "--conv-channels")
        require_choice("--likelihood", self.likelihood, tuple(LIKELIHOODS))
        require_choice("--objective", self.objective, OBJECTIVES)
        require_choice("--compile-mode", self.compile_mode, COMPILE_MODES)
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(
                f"--compile-mode {self.compile_mode} says how --compile compiles the step; add "
                f"--compile, or drop --compile-mode"
            )
        require_at_least("--samples", self.samples, 1)
        if self.objective == "iwae":
            self._validate_iwae()
        else:
            self._validate_elbo()

    def _validate_elbo(self) -> None:
        if self.samples > 1:
            raise ValueError(
                f"--samples {self.samples} is the number of importance samples of --objective iwae; "
                f"the ELBO objective takes one sample per image. Pass --objective iwae to train on "
                f"the importance-weighted bound, or drop --samples"
            )
        if self.estimator is not None:
            raise ValueError(
                f"--estimator {self.estimator} picks the gradient estimator of the importance-weighted "
                f"bound; pass --objective iwae with it, or drop --estimator"
            )

    def _validate_iwae(self) -> None:
        require_choice("--estimator", self.estimator, ESTIMATORS)
        # The bound log (1/K) sum_k p(x, z_k) / q(z_k|x) has no KL term of its own to weight or floor.
        no_kl_term = "the importance-weighted bound (--objective iwae) has no separate KL term"
        if self.beta != 1:
            raise ValueError(
                f"--beta {self.beta:g} weights the ELBO's KL term, but {no_kl_term}; drop --beta "
                f"(or pass --beta 1), or use --objective elbo"
            )
        if self.kl_warmup > 0:
            raise ValueError(
                f"--kl-warmup {self.kl_warmup} anneals the ELBO's KL term, but {no_kl_term}; drop "
                f"--kl-warmup (or pass --kl-warmup 0), or use --objective elbo"
            )
        if self.free_bits > 0:
            raise ValueError(
                f"--free-bits {self.free_bits:g} floors the ELBO's KL term, but {no_kl_term}; drop "
                f"--free-bits (or pass --free-bits 0), or use --objective elbo"
            )

    def amp_dtype_for(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype, or None without --amp; fp16 needs CUDA (GradScaler has no CPU path here)."""
        if not self.amp:
            return None
        if self.amp_dtype == "fp16" and device.type != "cuda":
            raise ValueError(
                "--amp-dtype fp16 needs a CUDA device (fp16 autocast with a GradScaler); on "
                f"{device.type} use the default --amp-dtype bf16"
            )
        return AMP_DTYPES[self.amp_dtype]


def require_at_least(flag: str, value: int, lowest: int) -> None:
    if value < lowest:
        raise ValueError(f"{flag} must be >= {lowest}, got {value}")


def require_finite(flag: str, value: float, *, above: float | None = None, at_least: float | None = None) -> None:
    """value must be a finite number, > above or >= at_least (argparse's float() takes nan and inf)."""
    if not math.isfinite(value):
        raise ValueError(f"{flag} must be a finite number, got {value}")
    if above is not None and not value > above:
        raise ValueError(f"{flag} must be > {above:g}, got {value:g}")
    if at_least is not None and not value >= at_least:
        raise ValueError(f"{flag} must be >= {at_least:g}, got {value:g}")


def require_choice(flag: str, value: object, choices: tuple[str, ...]) -> None:
    """For configs that did not come through argparse (a checkpoint's); argparse checks its own choices."""
    if value not in choices:
        raise ValueError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


def with_legacy_values(saved: dict) -> dict:
    """A saved config with the values LEGACY_VALUES implies for flags it predates."""
    return {**LEGACY_VALUES, **saved}


def require_seed(flag: str, value: int) -> None:
    if not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{flag} must be between 0 and 2**63 - 1 (torch takes 64-bit seeds), got {value}")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    if name not in DEVICE_CHOICES:
        raise ValueError(f"unknown --device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    return torch.device(name)


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="fastvae-train",
        description="Train a VAE on MNIST-style images with "
        "the fused fastvae ops, then report test -ELBO and importance-sampled NLL.",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default=d.dataset,
        help=f"{' | '.join(KNOWN_DATASETS)} | a folder holding the four IDX files (default: {d.dataset})",
    )
    g.add_argument(
        "--data-dir",
        default=d.data_dir,
        help="folder to look in first, then $FASTVAE_DATA, then "
        "the system copy, then a torchvision download (default: none)",
    )
    g.add_argument(
        "--binarize",
        choices=BINARIZE_CHOICES,
        default=d.binarize,
        help=f"dynamic: resampled each epoch; static: once; none: grey levels (default: {d.binarize})",
    )
    g.add_argument(
        "--val-size",
        type=int,
        default=d.val_size,
        help=f"training images held out for validation (default: {d.val_size})",
    )
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=ARCHS, default=d.arch, help=f"encoder/decoder type (default: {d.arch})")
    g.add_argument("--latent-dim", type=int, default=d.latent_dim, help=f"latent size (default: {d.latent_dim})")
    g.add_argument(
        "--hidden-dims", default=d.hidden_dims, help=f"comma-separated dense widths (default: {d.hidden_dims})"
    )
    g.add_argument(
        "--conv-channels",
        default=d.conv_channels,
        help=f"comma-separated channels of the stride-2 convs, conv arch only (default: {d.conv_channels})",
    )
    g.add_argument(
        "--likelihood",
        choices=tuple(LIKELIHOODS),
        default=None,
        help="p(x|z): bernoulli (of binary pixels), continuous-bernoulli (a density on [0, 1]) or "
        "gaussian (the decoder gives the mean, with a learned per-pixel variance) (default: "
        "continuous-bernoulli with --binarize none, else bernoulli)",
    )
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over the data (default: {d.epochs})")
    g.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"images per step per process (default: {d.batch_size})"
    )
    g.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default: {d.lr})")
    g.add_argument("--seed", type=int, default=d.seed, help=f"seed of everything random (default: {d.seed})")
    g.add_argument("--beta", type=float, default=d.beta, help=f"KL weight, beta-VAE (default: {d.beta})")
    g.add_argument(
        "--kl-warmup",
        type=int,
        default=d.kl_warmup,
        metavar="STEPS",
        help=f"anneal the KL weight linearly from 0 to beta over STEPS steps (default: {d.kl_warmup})",
    )
    g.add_argument(
        "--free-bits",
        type=float,
        default=d.free_bits,
        metavar="NATS",
        help=f"floor of each latent dimension's batch-mean KL in the loss (default: {d.free_bits})",
    )
    g.add_argument(
        "--max-steps",
        type=int,
        default=d.max_steps,
        help=f"stop after this many steps in all, e.g. for a smoke test; 0: no limit (default: {d.max_steps})",
    )
    g.add_argument(
        "--time-limit",
        type=float,
        default=d.time_limit,
        metavar="SECONDS",
        help="stop training once this invocation has trained this long (checked every --log-every "
        f"steps), then validate, save and evaluate as usual; 0: no limit (default: {d.time_limit:g})",
    )
    g.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default=d.objective,
        help="elbo: the one-sample ELBO; iwae: the importance-weighted bound on --samples samples "
        f"(Burda et al. 2016) (default: {d.objective})",
    )
    g.add_argument(
        "--samples",
        type=int,
        default=None,
        metavar="K",
        help=f"importance samples per image of --objective iwae (default: {DEFAULT_IWAE_SAMPLES} with "
        "iwae; elbo takes 1)",
    )
    g.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        default=None,
        help="gradient estimator of --objective iwae: iwae (the bound's gradient) or dreg (doubly "
        "reparameterized, Tucker et al. 2019) (default: iwae)",
    )
    g = p.add_argument_group("execution")
    g.add_argument("--amp", action="store_true", help="autocast the step (default: off)")
    g.add_argument(
        "--amp-dtype",
        choices=tuple(AMP_DTYPES),
        default=d.amp_dtype,
        help=f"bf16 on CPU or CUDA; fp16 (CUDA only) adds a GradScaler (default: {d.amp_dtype})",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the training step (default: off)")
    g.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        default=d.compile_mode,
        help="with --compile: reduce-overhead records CUDA graphs, for a GPU, where a small model's "
        f"step is bound by the host (default: {d.compile_mode})",
    )
    g.add_argument(
        "--device",
        choices=DEVICE_CHOICES,
        default=d.device,
        help=f"auto picks cuda when available (default: {d.device})",
    )
    g.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default=d.backend,
        help=f"fastvae backend; torch trains with the reference; auto defers to $FASTVAE_BACKEND "
        f"(default: {d.backend})",
    )
    g = p.add_argument_group("outputs and evaluation")
    g.add_argument(
        "--out", default=d.out, help="run folder; with --resume, the resumed run's folder (default: runs/<timestamp>)"
    )
    g.add_argument(
        "--resume",
        default=d.resume,
        metavar="RUN_OR_CHECKPOINT",
        help="continue a run folder (its last.pt) or a checkpoint; its config fills unset flags (default: none)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an --out folder that holds one, deleting its checkpoints, metrics "
        "and pictures (default: refuse)",
    )
    g.add_argument(
        "--iw-samples",
        type=int,
        default=d.iw_samples,
        help=f"importance samples per test image for the NLL; 0 skips it (default: {d.iw_samples})",
    )
    g.add_argument(
        "--iw-examples",
        type=int,
        default=d.iw_examples,
        help=f"test images that get the NLL; 0 means all (default: {d.iw_examples})",
    )
    g.add_argument(
        "--iw-batch-size",
        type=int,
        default=d.iw_batch_size,
        help=f"(image, sample) pairs per decoder call in the NLL; bounds memory (default: {d.iw_batch_size})",
    )
    g.add_argument(
        "--eval-batch-size",
        type=int,
        default=d.eval_batch_size,
        help=f"images per evaluation batch (default: {d.eval_batch_size})",
    )
    g.add_argument(
        "--log-every",
        type=int,
        default=d.log_every,
        help=f"steps between progress-bar updates (each one syncs) (default: {d.log_every})",
    )
    g.add_argument("--no-plots", dest="plots", action="store_false", help="skip the pictures (default: draw them)")
    return p


def parse_config(argv: list[str] | None) -> TrainConfig:
    """Flags -> a validated TrainConfig. With --resume, the saved run's config is the default for every
    flag not given, and --out defaults to the folder of the resumed checkpoint."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:
        source = resolve_checkpoint(args.resume)
        saved = with_legacy_values(load_checkpoint(source)["config"])
        known = {f.name for f in fields(TrainConfig)} - set(INVOCATION_FIELDS)
        inherited = {key: value for key, value in saved.items() if key in known}
        given = args
        parser.set_defaults(**inherited, out=str(source.parent))
        args = parser.parse_args(argv)
        if args.objective != saved["objective"]:
            # --samples and --estimator belong to the objective: a switched one starts from its own defaults.
            args.samples, args.estimator = given.samples, given.estimator
    cfg = TrainConfig(**vars(args))
    cfg.validate()
    return cfg
