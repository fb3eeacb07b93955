"""The fastvae-train loop: objective, step, epochs, checkpoints and the final evaluation.

Everything random in a step is keyed so a resumed run continues bit for bit:
batch order and dynamic binarization by (seed, epoch, rank), the fused op's noise
by torch's default CPU generator (saved per rank in every checkpoint), and all
evaluation noise by generators of its own that never touch the training stream.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import fastvae
from fastvae.train import checkpoint as ckpt
from fastvae.train.data import Datasets, EpochBatches, derive_seed, load_datasets, prepare_targets
from fastvae.train.distributed import DistInfo, all_reduce_sum, barrier, broadcast_object
from fastvae.train.evaluate import evaluate_elbo, evaluate_test
from fastvae.train.models import VAE, build_model
from fastvae.train.progress import TrainProgress
from fastvae.train.config import MODEL_FIELDS, TrainConfig, default_run_dir, pick_device


class ELBOObjective(nn.Module):
    """x [B, C, H, W] -> (loss, stats [2] = (sum of -log p(x|z), sum of KL) over the batch).

    loss = mean -log p(x|z) + kl_weight * KL term, where the KL term is the batch-mean
    KL, or with free bits sum_j max(free_bits, mean_b KL_bj) (Kingma et al. 2016)."""

    def __init__(self, model: VAE, free_bits: float) -> None:
        super().__init__()
        self.model, self.free_bits = model, free_bits

    def forward(self, x: Tensor, kl_weight: Tensor) -> tuple[Tensor, Tensor]:
        logits, mu, logvar, kl = self.model(x)
        batch = x.shape[0]
        kl_sum = kl.detach().sum()
        if self.free_bits <= 0:
            loss = fastvae.elbo_loss(logits, x, kl=kl, beta=kl_weight)
            recon_sum = loss.detach() * batch - kl_weight * kl_sum
            return loss, torch.stack([recon_sum, kl_sum])
        recon_sum = -fastvae.bernoulli_log_likelihood(logits, x, reduction="sum")
        per_dim = fastvae.gaussian_kl(mu, logvar, reduction="none").mean(dim=0)  # [L]
        loss = recon_sum / batch + kl_weight * per_dim.clamp_min(self.free_bits).sum()
        return loss, torch.stack([recon_sum.detach(), kl_sum])


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # the epoch being trained, 0-based
    batch: int = 0  # batches of that epoch already done
    step: int = 0  # optimizer steps in all
    best_val: float = math.inf
    history: list[dict] = field(default_factory=list)


@dataclass
class Run:
    config: TrainConfig
    data: Datasets
    model: VAE
    step_fn: nn.Module
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
    with _autocast(run):
        loss, stats = run.step_fn(x, weight)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.state.step += 1
    return stats


def train_epoch(run: Run, progress: TrainProgress) -> tuple[dict, bool, bool]:
    """Train the rest of epoch run.state.epoch; returns (train metrics, stopped by --max-steps, epoch done)."""
    cfg, state = run.config, run.state
    batches = EpochBatches(run.data.train, cfg.batch_size, state.epoch, cfg.seed, cfg.binarize,
                           run.dist.rank, run.dist.world_size)
    progress.start_epoch(state.epoch, len(batches), state.batch)
    sums = torch.zeros(3, dtype=torch.float64, device=run.device)  # recon, kl, count
    started, stopped = time.perf_counter(), False
    for x in batches.batches(state.batch):
        stats = train_step(run, x.to(run.device, non_blocking=True))
        sums[:2] += stats.double()
        sums[2] += x.shape[0]
        state.batch += 1
        if state.step % cfg.log_every == 0 or state.batch == len(batches):
            progress.update(state.batch, sums.tolist(), time.perf_counter() - started)
        if cfg.max_steps and state.step >= cfg.max_steps:
            stopped = True
            break
    seconds = time.perf_counter() - started
    recon, kl, count = all_reduce_sum(sums, run.dist).tolist()
    count = max(count, 1.0)
    metrics = {"train_neg_elbo": (recon + kl) / count, "train_recon": recon / count, "train_kl": kl / count,
               "kl_weight": kl_weight_at(cfg, state.step - 1), "samples_per_s": count / seconds,
               "train_seconds": seconds}
    return metrics, stopped, state.batch >= len(batches)


def checkpoint_state(run: Run) -> dict:
    """Everything a resume needs; every rank's RNG state is gathered (a collective call)."""
    rng = ckpt.capture_rng()
    if run.dist.enabled:
        gathered: list = [None] * run.dist.world_size
        torch.distributed.all_gather_object(gathered, rng)
    else:
        gathered = [rng]
    s = run.state
    return {"format_version": ckpt.FORMAT_VERSION, "config": run.config.to_dict(),
            "model_config": run.model.config.to_dict(), "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(), "rng": gathered,
            "epoch": s.epoch, "batch": s.batch, "step": s.step, "best_val": s.best_val, "history": s.history,
            "world_size": run.dist.world_size}


def save_checkpoints(run: Run, improved: bool) -> None:
    state = checkpoint_state(run)
    if run.dist.is_main:
        ckpt.save_atomic(state, ckpt.checkpoint_path(run.run_dir, "last"))
        if improved:
            ckpt.save_atomic(state, ckpt.checkpoint_path(run.run_dir, "best"))
    barrier(run.dist)


def write_metrics(run: Run) -> None:
    """metrics.jsonl from the history (rewritten whole, so a resume never duplicates rows)."""
    if run.dist.is_main:
        lines = "".join(json.dumps(row) + "\n" for row in run.state.history)
        (run.run_dir / "metrics.jsonl").write_text(lines)


def end_of_segment(run: Run, train_metrics: dict, started: float, val_split, epoch_done: bool) -> dict:
    """Validate, record the metrics row, checkpoint last (and best when validation improved).

    A segment is an epoch, or its first part when --max-steps stops it."""
    cfg, state = run.config, run.state
    val = evaluate_elbo(run.model, val_split, cfg.eval_batch_size, run.device, derive_seed("val", cfg.seed),
                        run.dist)
    row = {"epoch": state.epoch + 1, "epoch_complete": epoch_done, "step": state.step, **train_metrics,
           **{f"val_{key}": value for key, value in val.items()}, "seconds": time.perf_counter() - started}
    state.history.append(row)
    improved = val["neg_elbo"] < state.best_val
    state.best_val = min(state.best_val, val["neg_elbo"])
    if epoch_done:
        state.epoch, state.batch = state.epoch + 1, 0
    write_metrics(run)
    save_checkpoints(run, improved)
    return row


def fit(run: Run, progress: TrainProgress) -> None:
    cfg, state = run.config, run.state
    val_split = prepare_targets(run.data.val, cfg.binarize, "val")
    while state.epoch < cfg.epochs:
        started = time.perf_counter()
        train_metrics, stopped, epoch_done = train_epoch(run, progress)
        row = end_of_segment(run, train_metrics, started, val_split, epoch_done)
        progress.end_epoch(row)
        if stopped:
            break


# ---------------------------------------------------------------------------
# Building a run
# ---------------------------------------------------------------------------
def make_run_dir(cfg: TrainConfig, dist: DistInfo) -> Path:
    run_dir = Path(cfg.out) if cfg.out else default_run_dir()
    run_dir = Path(broadcast_object(str(run_dir), dist))
    if dist.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ckpt.CheckpointError(f"cannot create run folder {run_dir}: {error}; pass another --out") from error
    barrier(dist)
    return run_dir


def build_run(cfg: TrainConfig, dist: DistInfo) -> Run:
    device = pick_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    amp_dtype = cfg.amp_dtype_for(device)
    resume_state = _load_resume(cfg, dist)
    data = load_datasets(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.seed)
    if cfg.binarize != "dynamic":
        data.train = prepare_targets(data.train, cfg.binarize, "train")
    torch.manual_seed(derive_seed("torch", cfg.seed, dist.rank))
    model = build_model(cfg.model_config(data.image_shape)).to(device)
    objective: nn.Module = ELBOObjective(model, cfg.free_bits)
    if dist.enabled:
        ids = [device.index] if device.type == "cuda" else None
        objective = nn.parallel.DistributedDataParallel(objective, device_ids=ids)
    step_fn = torch.compile(objective) if cfg.compile else objective
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    cfg.out = str(make_run_dir(cfg, dist))
    run = Run(cfg, data, model, step_fn, optimizer, scaler, device, amp_dtype, dist, Path(cfg.out), Progress())
    if resume_state is not None:
        _restore(run, resume_state)
    return run


def _load_resume(cfg: TrainConfig, dist: DistInfo) -> dict | None:
    if not cfg.resume:
        return None
    path = ckpt.resolve_checkpoint(cfg.resume)
    state = ckpt.load_checkpoint(path)
    saved = {key: state["config"].get(key) for key in MODEL_FIELDS}
    wanted = {key: getattr(cfg, key) for key in MODEL_FIELDS}
    ckpt.check_same_model(saved, wanted, path)
    if state["world_size"] != dist.world_size:
        raise ckpt.CheckpointError(f"{path} was written by {state['world_size']} processes and this run has "
                                   f"{dist.world_size}; resume with the same count (torchrun --nproc-per-node "
                                   f"{state['world_size']}) so batches and noise continue unchanged")
    return state


def _restore(run: Run, state: dict) -> None:
    try:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise ckpt.CheckpointError(f"checkpoint {run.config.resume} does not fit this model: {error}") from error
    run.scaler.load_state_dict(state["scaler"])
    ckpt.restore_rng(state["rng"][run.dist.rank])
    run.state = Progress(epoch=state["epoch"], batch=state["batch"], step=state["step"],
                         best_val=state["best_val"], history=list(state["history"]))


def final_evaluation(run: Run, progress: TrainProgress) -> tuple[dict, VAE]:
    """Test numbers of the best checkpoint (by validation -ELBO), saved as test_metrics.json;
    returns them and the best model."""
    cfg = run.config
    best = ckpt.load_checkpoint(ckpt.checkpoint_path(run.run_dir, "best"), map_location=run.device)
    model = build_model(run.model.config).to(run.device)
    model.load_state_dict(best["model"])
    test = prepare_targets(run.data.test, cfg.binarize, "test")
    nll_examples = cfg.iw_examples if 0 < cfg.iw_examples < len(test) else len(test)
    with progress.evaluating(nll_examples if cfg.iw_samples else 0) as advance:
        result = evaluate_test(model, test, iw_samples=cfg.iw_samples, iw_examples=cfg.iw_examples,
                               iw_batch_size=cfg.iw_batch_size, batch_size=cfg.eval_batch_size,
                               device=run.device, seed=derive_seed("test", cfg.seed), dist_info=run.dist,
                               progress=advance)
    result["checkpoint"] = "best.pt"
    result["best_epoch"] = best["history"][-1]["epoch"] if best["history"] else 0
    if run.dist.is_main:
        (run.run_dir / "test_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result, model


def prepare(cfg: TrainConfig, dist: DistInfo) -> Run:
    """Validate flags, build the run, and write config.json (rank 0)."""
    cfg.validate()
    run = build_run(cfg, dist)
    if dist.is_main:
        info = {**cfg.to_dict(), "model_config": run.model.config.to_dict(), "data_folder": str(run.data.folder),
                "world_size": dist.world_size, "device": str(run.device), "torch": torch.__version__,
                "fastvae": fastvae.__version__}
        (run.run_dir / "config.json").write_text(json.dumps(info, indent=2) + "\n")
    return run
