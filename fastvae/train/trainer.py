"""The fastvae-train loop: objective, step, epochs, checkpoints and the final evaluation.

Everything random in a step is keyed so a resumed run continues bit for bit:
batch order and dynamic binarization by (seed, epoch, rank), the fused op's noise
by torch's default CPU generator (saved per rank in every checkpoint), and all
evaluation noise by generators of its own that never touch the training stream.

Each segment (an epoch, or its part up to --max-steps) ends with validation and a
save: last.pt, then best.pt when validation improved, then metrics.jsonl (see
checkpoint.py for why in that order). Nothing is saved from weights whose losses
are not finite; training stops there instead, keeping the last good checkpoint.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import fastvae
from fastvae.backend import unavailable_reason
from fastvae.errors import BackendUnavailableError
from fastvae.train import checkpoint as ckpt
from fastvae.train import plots
from fastvae.train.config import MODEL_FIELDS, TrainConfig, default_run_dir, pick_device, with_legacy_values
from fastvae.train.data import Datasets, EpochBatches, derive_seed, load_datasets, prepare_targets, to_unit
from fastvae.train.distributed import DistInfo, all_reduce_sum, barrier, broadcast_object
from fastvae.train.evaluate import evaluate_elbo, evaluate_test, likelihood_fields
from fastvae.train.models import VAE, build_model
from fastvae.train.progress import TrainProgress
from fastvae.train.run_folder import RunFolderError, RunFolderLock, remove_stale_temp_files, to_json, write_file

# What a run writes into its folder besides pictures; a folder holding any of the first four holds a run.
METRICS_FILE, TEST_METRICS_FILE, CONFIG_FILE = "metrics.jsonl", "test_metrics.json", "config.json"
RUN_RESULTS = ("last.pt", "best.pt", METRICS_FILE, TEST_METRICS_FILE)
EVAL_RESULTS_GLOB = "eval-*.json"  # what fastvae-eval writes beside a checkpoint


class TrainingDiverged(RuntimeError):
    """The loss or the weights stopped being finite; the message names the step and what to try."""


class ELBOObjective(nn.Module):
    """x [B, C, H, W] -> (loss, stats [3] = sums over the batch of (-ELBO, -log p(x|z), KL)).

    loss = mean -log p(x|z) + kl_weight * KL term, where the KL term is the batch-mean
    KL, or with free bits sum_j max(free_bits, mean_b KL_bj) (Kingma et al. 2016); p(x|z)
    is the model's likelihood. The -ELBO in the stats is the unweighted sum of the two terms."""

    STATS = ("neg_elbo", "recon", "kl")

    def __init__(self, model: VAE, free_bits: float) -> None:
        super().__init__()
        self.model, self.free_bits = model, free_bits

    def forward(self, x: Tensor, kl_weight: Tensor) -> tuple[Tensor, Tensor]:
        decoded, mu, logvar, kl = self.model(x)
        batch = x.shape[0]
        kl_sum = kl.detach().sum()
        if self.free_bits <= 0:
            loss = fastvae.elbo_loss(
                decoded,
                x,
                kl=kl,
                beta=kl_weight,
                likelihood=self.model.likelihood,
                decoder_logvar=self.model.decoder_log_variance(),
            )
            recon_sum = loss.detach() * batch - kl_weight * kl_sum
        else:
            recon = -self.model.log_likelihood(decoded, x, reduction="sum")
            per_dim = fastvae.gaussian_kl(mu, logvar, reduction="none").mean(dim=0)  # [L]
            loss = recon / batch + kl_weight * per_dim.clamp_min(self.free_bits).sum()
            recon_sum = recon.detach()
        return loss, torch.stack([recon_sum + kl_sum, recon_sum, kl_sum])


class IWAEObjective(nn.Module):
    """x [B, C, H, W] -> (loss, stats [1] = the sum over the batch of -L_K), L_K the importance-weighted
    bound on `samples` samples per image (Burda et al. 2016), whose gradients come from `estimator`
    (fastvae.iwae_loss). The K * B samples go through the decoder as one batch."""

    STATS = ("neg_iw_bound",)

    def __init__(self, model: VAE, samples: int, estimator: str) -> None:
        super().__init__()
        self.model, self.samples, self.estimator = model, samples, estimator

    def forward(self, x: Tensor, kl_weight: Tensor) -> tuple[Tensor, Tensor]:
        """kl_weight: unused (the bound has no KL term to weight; the config refuses a --beta), taken so
        that the step calls both objectives alike."""
        mu, logvar = self.model.encode(x)
        z = fastvae.reparameterize(mu, logvar, samples=self.samples)  # [K, B, L]
        decoded = self.model.decode(z)  # [K, B, C, H, W]
        loss = fastvae.iwae_loss(
            decoded,
            x,
            z,
            mu,
            logvar,
            likelihood=self.model.likelihood,
            estimator=self.estimator,
            decoder_logvar=self.model.decoder_log_variance(),
        )
        return loss, (loss.detach() * x.shape[0]).reshape(1)


def build_objective(cfg: TrainConfig, model: VAE) -> nn.Module:
    if cfg.objective == "iwae":
        return IWAEObjective(model, cfg.samples, cfg.estimator)
    return ELBOObjective(model, cfg.free_bits)


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # the epoch being trained, 0-based
    batch: int = 0  # batches of that epoch already done
    step: int = 0  # optimizer steps in all
    best_val: float = math.inf
    best_step: int = -1  # the step of the checkpoint in best.pt (-1: none yet)
    history: list[dict] = field(default_factory=list)
    # Posterior means [n, 2] of the first test images after each completed epoch (2-D latent with pictures).
    latent_frames: list[Tensor] = field(default_factory=list)


@dataclass
class Run:
    config: TrainConfig
    data: Datasets
    model: VAE
    step_fn: nn.Module
    stat_names: tuple[str, ...]  # what the step's stats are sums of (the objective's STATS)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    dist: DistInfo
    run_dir: Path
    state: Progress


def kl_weight_at(config: TrainConfig, step: int) -> float:
    """beta, ramped linearly from ~0 over the first --kl-warmup steps."""
    if config.kl_warmup <= 0:
        return config.beta
    return config.beta * min(1.0, (step + 1) / config.kl_warmup)


def _autocast(run: Run):
    if run.amp_dtype is None:
        return nullcontext()
    return torch.autocast(run.device.type, dtype=run.amp_dtype)


def train_step(run: Run, x: Tensor) -> Tensor:
    """One optimizer step on x [B, C, H, W]; returns detached stats [2] (sums, no host sync)."""
    weight = torch.tensor(kl_weight_at(run.config, run.state.step), device=run.device)
    if run.config.compile and run.config.compile_mode == "reduce-overhead":
        # Each call is a new step: the CUDA graphs may reuse the last step's output memory.
        torch.compiler.cudagraph_mark_step_begin()
    with _autocast(run):
        loss, stats = run.step_fn(x, weight)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.state.step += 1
    return stats


def train_epoch(run: Run, progress: TrainProgress, deadline: float) -> tuple[dict, str | None, bool]:
    """Train the rest of epoch run.state.epoch, or until time.perf_counter() passes `deadline`;
    returns (train metrics, the flag that stopped training or None, epoch done).

    The loss sums are read on the host only every --log-every steps (and at the end), which is
    also when they are checked for NaN and inf (a non-finite loss poisons the sums for good) and
    when --time-limit's clock is read (the steps have just been waited for, so it counts them)."""
    cfg, state = run.config, run.state
    batches = EpochBatches(
        run.data.train, cfg.batch_size, state.epoch, cfg.seed, cfg.binarize, run.dist.rank, run.dist.world_size
    )
    progress.start_epoch(state.epoch, len(batches), state.batch)
    stats_count = len(run.stat_names)
    sums = torch.zeros(stats_count + 1, dtype=torch.float64, device=run.device)  # the stats, then images
    started, stopped = time.perf_counter(), None
    checked_step = state.step  # the sums were finite up to here
    for x in batches.batches(state.batch):
        stats = train_step(run, x.to(run.device, non_blocking=True))
        sums[:stats_count] += stats.double()
        sums[stats_count] += x.shape[0]
        state.batch += 1
        logged = state.step % cfg.log_every == 0 or state.batch == len(batches)
        if logged:
            totals = sums.tolist()
            stop_unless_finite(run, "training loss", totals[:stats_count], checked_step)
            checked_step = state.step
            progress.update(
                state.batch, _per_image(run.stat_names, totals), time.perf_counter() - started, totals[stats_count]
            )
        if cfg.max_steps and state.step >= cfg.max_steps:
            stopped = "--max-steps"
        elif logged and _out_of_time(deadline, run.dist):
            stopped = "--time-limit"
        if stopped:
            break
    seconds = time.perf_counter() - started
    totals = all_reduce_sum(sums, run.dist).tolist()
    stop_unless_finite(run, "training loss", totals[:stats_count], checked_step)
    metrics = {
        **{f"train_{name}": value for name, value in _per_image(run.stat_names, totals).items()},
        "objective": cfg.objective,
    }
    if cfg.objective == "iwae":
        metrics.update({"samples": cfg.samples, "estimator": cfg.estimator})
    else:
        metrics["kl_weight"] = kl_weight_at(cfg, state.step - 1)
    metrics.update({"samples_per_s": max(totals[stats_count], 1.0) / seconds, "train_seconds": seconds})
    return metrics, stopped, state.batch >= len(batches)


def _per_image(names: tuple[str, ...], totals: list[float]) -> dict[str, float]:
    """The stats' sums (then the image count, last in `totals`) as per-image means by name."""
    count = max(totals[len(names)], 1.0)
    return {name: total / count for name, total in zip(names, totals[: len(names)], strict=True)}


def _out_of_time(deadline: float, dist: DistInfo) -> bool:
    """Whether --time-limit has run out; under DDP rank 0's clock decides for all (a collective call, made
    only with a time limit), so that every rank stops after the same step."""
    if deadline == math.inf:
        return False
    return bool(broadcast_object(time.perf_counter() >= deadline, dist))


def stop_unless_finite(run: Run, what: str, values: list[float], checked_step: int) -> None:
    """Raise TrainingDiverged if any of `values` is NaN or inf; they were finite at `checked_step`.

    Steps that fp16's GradScaler skips for inf gradients have finite losses and pass."""
    if all(math.isfinite(value) for value in values):
        return
    state, cfg = run.state, run.config
    first = checked_step + 1
    when = f"at step {state.step}" if first >= state.step else f"between steps {first} and {state.step}"
    last = ckpt.checkpoint_path(run.run_dir, ckpt.LAST)
    if state.history:
        kept = (
            f"{last} (step {state.history[-1]['step']}) is the last good checkpoint and is kept; continue "
            f"from it with fastvae-train --resume {run.run_dir} --lr {cfg.lr / 10:g}"
        )
    else:
        kept = f"no checkpoint was written yet; start again with a lower --lr (e.g. {cfg.lr / 10:g})"
    tries = [f"a lower --lr (this run: {cfg.lr:g})"]
    if run.amp_dtype == torch.float16:
        tries.append("--amp-dtype bf16 (fp16 overflows where bf16 does not)")
    if cfg.beta > 1:
        tries.append(f"a smaller --beta (this run: {cfg.beta:g})")
    raise TrainingDiverged(
        f"the {what} became non-finite ({', '.join(f'{v:g}' for v in values)}) {when}; "
        f"training stopped. Try {', or '.join(tries)}. {kept}"
    )


def checkpoint_state(run: Run) -> dict:
    """Everything a resume needs; every rank's RNG state is gathered (a collective call)."""
    rng = ckpt.capture_rng()
    if run.dist.enabled:
        gathered: list = [None] * run.dist.world_size
        torch.distributed.all_gather_object(gathered, rng)
    else:
        gathered = [rng]
    s = run.state
    return {
        "config": run.config.to_dict(),
        "model_config": run.model.config.to_dict(),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": gathered,
        "epoch": s.epoch,
        "batch": s.batch,
        "step": s.step,
        "best_val": s.best_val,
        "best_step": s.best_step,
        "history": s.history,
        "latent_frames": s.latent_frames,
        "world_size": run.dist.world_size,
    }


def save_checkpoints(run: Run, improved: bool) -> None:
    """last.pt, then best.pt when validation improved, then metrics.jsonl (rank 0 writes)."""
    state = checkpoint_state(run)
    if run.dist.is_main:
        last, best = (ckpt.checkpoint_path(run.run_dir, name) for name in (ckpt.LAST, ckpt.BEST))
        ckpt.save_checkpoint(state, *((last, best) if improved else (last,)))
        write_metrics(run)
    barrier(run.dist)


def write_metrics(run: Run) -> None:
    """metrics.jsonl from the history (rewritten whole, so a resume never duplicates rows)."""
    write_file(run.run_dir / METRICS_FILE, "".join(to_json(row) + "\n" for row in run.state.history))


def end_of_segment(run: Run, train_metrics: dict, started: float, val_split, epoch_done: bool) -> dict:
    """Validate, record the metrics row, checkpoint last (and best when validation improved).

    A segment is an epoch, or its first part when --max-steps stops it."""
    cfg, state = run.config, run.state
    val = evaluate_elbo(run.model, val_split, cfg.eval_batch_size, run.device, derive_seed("val", cfg.seed), run.dist)
    # The last look at the weights before they are saved: never checkpoint a model that gives NaN.
    stop_unless_finite(run, "validation -ELBO", [val["neg_elbo"]], state.step - 1)
    row = {
        "epoch": state.epoch + 1,
        "epoch_complete": epoch_done,
        "step": state.step,
        **train_metrics,
        **{f"val_{key}": value for key, value in val.items()},
        "seconds": time.perf_counter() - started,
    }
    state.history.append(row)
    improved = val["neg_elbo"] < state.best_val
    if improved:
        state.best_val, state.best_step = val["neg_elbo"], state.step
    if epoch_done:
        state.epoch, state.batch = state.epoch + 1, 0
        if run.dist.is_main and cfg.plots and run.model.config.latent_dim == 2:
            images = to_unit(run.data.test.images[: plots.FRAME_POINTS])
            state.latent_frames.append(plots.posterior_means(run.model, images))
    save_checkpoints(run, improved)
    return row


def fit(run: Run, progress: TrainProgress) -> None:
    """Train until --epochs or --max-steps; a run resumed there trains nothing and says so."""
    cfg, state = run.config, run.state
    if cfg.max_steps and state.step >= cfg.max_steps:
        progress.note(
            f"already at --max-steps {cfg.max_steps} (step {state.step}): nothing to train, "
            f"evaluating best.pt. Pass a larger --max-steps (or 0) to train on"
        )
        return
    if state.epoch >= cfg.epochs:
        progress.note(
            f"all {cfg.epochs} --epochs are trained: nothing to train, evaluating best.pt. Pass a "
            f"larger --epochs to train on"
        )
        return
    val_split = prepare_targets(run.data.val, cfg.binarize, "val")
    # This invocation's own budget: a resumed run gets --time-limit again, counted from here.
    deadline = time.perf_counter() + cfg.time_limit if cfg.time_limit else math.inf
    while state.epoch < cfg.epochs:
        started = time.perf_counter()
        train_metrics, stopped, epoch_done = train_epoch(run, progress, deadline)
        row = end_of_segment(run, train_metrics, started, val_split, epoch_done)
        progress.end_epoch(row)
        if stopped == "--time-limit":
            progress.note(
                f"--time-limit {cfg.time_limit:g} s reached at step {state.step}: training stopped, "
                f"evaluating best.pt. Continue with fastvae-train --resume {run.run_dir}"
            )
        if stopped:
            break


# ---------------------------------------------------------------------------
# The run folder
# ---------------------------------------------------------------------------
def open_run_folder(cfg: TrainConfig, dist: DistInfo, resources: ExitStack) -> Path:
    """The run folder, ready for this run; every rank returns once it is.

    Rank 0 creates the folder, locks it until `resources` closes, removes the temporary files
    of killed writers, and then: a new run refuses a folder that holds one (unless --overwrite,
    which clears it); a run resumed in its own folder finishes any save a kill interrupted; a
    run resumed into another folder starts that folder with copies of its last and best
    checkpoints."""
    run_dir = Path(cfg.out) if cfg.out else default_run_dir()
    run_dir = Path(broadcast_object(str(run_dir), dist))
    if dist.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunFolderError(
                f"cannot create run folder {run_dir}: {error.strerror or error}; pass another --out"
            ) from error
        resources.enter_context(RunFolderLock(run_dir))
        remove_stale_temp_files(run_dir)
        _prepare_contents(cfg, run_dir)
    barrier(dist)
    return run_dir


def _prepare_contents(cfg: TrainConfig, run_dir: Path) -> None:
    last = ckpt.checkpoint_path(run_dir, ckpt.LAST)
    source = ckpt.resolve_checkpoint(cfg.resume) if cfg.resume else None
    if source is not None and source.resolve() == last.resolve():
        if cfg.overwrite:
            raise ValueError(
                f"--overwrite would delete {last}, the checkpoint --resume continues; drop "
                f"--overwrite to continue the run, or drop --resume to start it over"
            )
        ckpt.check_run_checkpoints(run_dir, repair=True)
        return
    if source is not None and source.parent.resolve() == run_dir.resolve():
        raise ValueError(
            f"--resume {source} would continue from {source.name} inside its own run folder and "
            f"replace the run's later last.pt; pass --out NEW_FOLDER to branch a new run from it"
        )
    held = [name for name in RUN_RESULTS if (run_dir / name).exists()]
    if held and not cfg.overwrite:
        raise ValueError(
            f"run folder {run_dir} already holds a run ({', '.join(held)}). Continue it with "
            f"--resume {run_dir}, start it over with --overwrite (deleting its checkpoints, metrics "
            f"and pictures), or pass another --out"
        )
    if held:
        _clear_run(run_dir)
    if source is not None:
        _branch_from(source, run_dir)


def _clear_run(run_dir: Path) -> None:
    """Delete what an earlier run wrote (and fastvae-eval beside it), nothing else."""
    names = [*RUN_RESULTS, CONFIG_FILE, *plots.PICTURE_FILES]
    for path in [run_dir / name for name in names] + sorted(run_dir.glob(EVAL_RESULTS_GLOB)):
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            raise RunFolderError(f"--overwrite could not delete {path}: {error.strerror or error}") from error


def _branch_from(source: Path, run_dir: Path) -> None:
    """Start `run_dir` with the checkpoint `source` and the best checkpoint it names (beside it, or itself)."""
    state = ckpt.load_checkpoint(source)
    best_source = source
    if state["best_step"] != state["step"]:
        best_source = ckpt.checkpoint_path(source.parent, ckpt.BEST)
        found = ckpt.load_checkpoint(best_source)["step"] if best_source.is_file() else None
        if found != state["best_step"]:
            held = "nothing" if found is None else f"step {found}"
            raise ckpt.CheckpointError(
                f"{source} names step {state['best_step']} as its best checkpoint, but "
                f"{best_source} holds {held}; resume from a run folder whose best.pt "
                f"belongs to its last.pt"
            )
    write_file(ckpt.checkpoint_path(run_dir, ckpt.LAST), source.read_bytes())
    write_file(ckpt.checkpoint_path(run_dir, ckpt.BEST), best_source.read_bytes())


# ---------------------------------------------------------------------------
# Building a run
# ---------------------------------------------------------------------------
def build_run(cfg: TrainConfig, dist: DistInfo, resources: ExitStack) -> Run:
    device = pick_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    amp_dtype = cfg.amp_dtype_for(device)
    if cfg.backend != "auto" and (reason := unavailable_reason(cfg.backend, device)) is not None:
        raise BackendUnavailableError(f"--backend {cfg.backend} cannot run on {device}: {reason}")
    if cfg.compile_mode == "reduce-overhead" and device.type != "cuda":
        raise ValueError(
            f"--compile-mode reduce-overhead records CUDA graphs, and this run is on {device.type}; "
            f"drop --compile-mode there (or run on a GPU with --device cuda)"
        )
    data = _load_data(cfg)
    run_dir = open_run_folder(cfg, dist, resources)
    resume_state = _load_resume(cfg, dist, run_dir)
    if cfg.binarize != "dynamic":
        data.train = prepare_targets(data.train, cfg.binarize, "train")
    torch.manual_seed(derive_seed("torch", cfg.seed, dist.rank))
    model = build_model(cfg.model_config(data.image_shape)).to(device)
    objective = build_objective(cfg, model)
    stat_names = objective.STATS
    if dist.enabled:
        ids = [device.index] if device.type == "cuda" else None
        objective = nn.parallel.DistributedDataParallel(objective, device_ids=ids)
    # Without guards on fastvae's own code: see fastvae.compiler.
    step_fn = torch.compile(objective, options=fastvae.compile_options(cfg.compile_mode)) if cfg.compile else objective
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    cfg.out = str(run_dir)
    run = Run(cfg, data, model, step_fn, stat_names, optimizer, scaler, device, amp_dtype, dist, run_dir, Progress())
    if resume_state is not None:
        _restore(run, resume_state)
    return run


def _load_data(cfg: TrainConfig) -> Datasets:
    try:
        return load_datasets(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.seed)
    except ValueError as error:  # load_datasets raises ValueError for val_size only
        raise ValueError(
            f"--val-size {cfg.val_size} leaves no training images: {error}; pass a smaller --val-size"
        ) from error


def _load_resume(cfg: TrainConfig, dist: DistInfo, run_dir: Path) -> dict | None:
    """The state to continue from: the run folder's last.pt, which open_run_folder checked (or copied)."""
    if not cfg.resume:
        return None
    path = ckpt.checkpoint_path(run_dir, ckpt.LAST)
    state = ckpt.load_checkpoint(path)
    saved_config = with_legacy_values(state["config"])
    saved = {key: saved_config.get(key) for key in MODEL_FIELDS}
    wanted = {key: getattr(cfg, key) for key in MODEL_FIELDS}
    diffs = [
        f"{key}: checkpoint {saved[key]!r}, this run {wanted[key]!r}"
        for key in MODEL_FIELDS
        if saved[key] != wanted[key]
    ]
    if diffs:
        raise ckpt.CheckpointError(
            f"checkpoint {path} was trained with another model config "
            f"({'; '.join(diffs)}). Drop the conflicting flags to use the checkpoint's "
            f"values, or start a new run with another --out"
        )
    if state["world_size"] != dist.world_size:
        raise ckpt.CheckpointError(
            f"{path} was written by {state['world_size']} processes and this run has "
            f"{dist.world_size}; resume with the same count (torchrun --nproc-per-node "
            f"{state['world_size']}) so batches and noise continue unchanged"
        )
    return state


def _restore(run: Run, state: dict) -> None:
    try:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise ckpt.CheckpointError(f"checkpoint {run.config.resume} does not fit this model: {error}") from error
    # The optimizer state brings the saved learning rate; a --lr given on resume wins over it.
    for group in run.optimizer.param_groups:
        group["lr"] = run.config.lr
    run.scaler.load_state_dict(state["scaler"])
    ckpt.restore_rng(state["rng"][run.dist.rank])
    run.state = Progress(
        epoch=state["epoch"],
        batch=state["batch"],
        step=state["step"],
        best_val=state["best_val"],
        best_step=state["best_step"],
        history=list(state["history"]),
        latent_frames=list(state["latent_frames"]),
    )


def final_evaluation(run: Run, progress: TrainProgress) -> tuple[dict, VAE]:
    """Test numbers of the best checkpoint (by validation -ELBO), saved as test_metrics.json;
    returns them and the best model."""
    cfg = run.config
    path = ckpt.checkpoint_path(run.run_dir, ckpt.BEST)
    best = ckpt.load_checkpoint(path)
    if best["step"] != run.state.best_step:
        raise ckpt.CheckpointError(
            f"{path} holds step {best['step']}, but this run's best checkpoint is step "
            f"{run.state.best_step}: best.pt was replaced while the run was going. "
            f"Use last.pt, or train again"
        )
    model = ckpt.model_from_checkpoint(best, path).to(run.device)
    test = prepare_targets(run.data.test, cfg.binarize, "test")
    nll_examples = cfg.iw_examples if 0 < cfg.iw_examples < len(test) else len(test)
    with progress.evaluating(nll_examples if cfg.iw_samples else 0) as advance:
        result = evaluate_test(
            model,
            test,
            iw_samples=cfg.iw_samples,
            iw_examples=cfg.iw_examples,
            iw_batch_size=cfg.iw_batch_size,
            batch_size=cfg.eval_batch_size,
            device=run.device,
            seed=derive_seed("test", cfg.seed),
            dist_info=run.dist,
            progress=advance,
        )
    result.update(
        {
            **likelihood_fields(model.likelihood, cfg.binarize),
            "checkpoint": path.name,
            "checkpoint_sha256": best["sha256"],
            "best_step": best["step"],
            "best_epoch": best["history"][-1]["epoch"],
        }
    )
    if run.dist.is_main:
        write_file(run.run_dir / TEST_METRICS_FILE, to_json(result, indent=2) + "\n")
    return result, model


def prepare(cfg: TrainConfig, dist: DistInfo, resources: ExitStack) -> Run:
    """Build the run and (rank 0) write config.json, and metrics.jsonl of a resumed run.

    resources: closed when the run ends; it holds the run folder's lock."""
    run = build_run(cfg, dist, resources)
    if dist.is_main:
        info = {
            **cfg.to_dict(),
            "model_config": run.model.config.to_dict(),
            "data_folder": str(run.data.folder),
            "world_size": dist.world_size,
            "distributed_backend": dist.backend,
            "device": str(run.device),
            "torch": torch.__version__,
            "fastvae": fastvae.__version__,
        }
        write_file(run.run_dir / CONFIG_FILE, to_json(info, indent=2) + "\n")
        # A kill between last.pt and metrics.jsonl leaves the rows one save behind; last.pt decides.
        if run.state.history:
            write_metrics(run)
    return run
