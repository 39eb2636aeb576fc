"""The training loop behind ``scd-train``.

One function, :func:`train`, takes a resolved :class:`ExperimentConfig` and a run folder. It fits the
normaliser on the train split, builds the policy named by ``policy.type``, and optimises it with AdamW
(parameter groups from the policy: no decay on gains/biases, a larger decoder lr), warm-up + cosine,
EMA, gradient clipping and bf16 autocast on CUDA. Under ``torchrun`` each rank trains on its own shard
and rank 0 alone writes logs and checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from scd_policy.config import ConfigError, ExperimentConfig
from scd_policy.conventions import normalizer_mode
from scd_policy.data.dataset import WindowedDataset, input_shapes, make_datasets
from scd_policy.data.dataset import action_dim as dataset_action_dim
from scd_policy.data.statistics import fit_normalizer
from scd_policy.io import atomic_write_text
from scd_policy.policies import Policy, make_policy
from scd_policy.training.checkpoint import (
    TrainState,
    best_success,
    ensure_new_run_folder,
    freeze_parameters,
    init_weights,
    latest_checkpoint,
    load_checkpoint,
    policy_folder,
    prepare_run_folder,
    resumable_checkpoint,
    save_best,
    save_checkpoint,
)
from scd_policy.training.distributed import DistInfo, all_reduce_mean, barrier, init_distributed, shutdown
from scd_policy.training.ema import EMA
from scd_policy.training.sampler import ResumableShardedSampler
from scd_policy.training.schedule import warmup_cosine

log = logging.getLogger(__name__)

# evaluate(policy, step) -> metrics with at least "success_rate"
RolloutFn = Callable[[Policy, int], dict[str, float]]


class _LossModule(nn.Module):
    """Lets DDP wrap ``compute_loss`` (DDP synchronises gradients of whatever ``forward`` computes)."""

    def __init__(self, policy: Policy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.policy.compute_loss(batch)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available; use train.device=cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"train.device={name!r} is not a device torch knows ({error})") from None


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def _infinite(loader: DataLoader[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    # The sampler itself is infinite; this only restarts worker iterators if a loader ever ends.
    while True:
        yield from loader


def _make_loader(
    dataset: WindowedDataset, batch_size: int, sampler: ResumableShardedSampler | None, num_workers: int
) -> DataLoader[dict[str, torch.Tensor]]:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        # The loader draws worker seeds from this generator, not from the global RNG, whose state is
        # checkpointed: a resumed run then continues the exact random stream of the interrupted one.
        generator=torch.Generator().manual_seed(0),
    )


@torch.no_grad()
def validation_loss(policy: Policy, dataset: WindowedDataset, batch_size: int, device: torch.device) -> float:
    """Mean loss over (up to 8 batches of) the validation split, with a fixed noise seed."""
    if len(dataset) == 0:
        return math.nan
    policy.eval()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        loader = _make_loader(dataset, batch_size, None, 0)
        losses = []
        for i, batch in enumerate(loader):
            if i >= 8:
                break
            loss, _ = policy.compute_loss(_to_device(batch, device))
            losses.append(float(loss))
    return float(sum(losses) / len(losses)) if losses else math.nan


def non_finite_loss_message(loss: float, step: int, batch: dict[str, torch.Tensor]) -> str:
    """Why the loss is NaN/inf: the batch keys holding NaN/inf, or (none) a diverging optimisation."""
    bad = [
        key for key, value in batch.items() if value.is_floating_point() and not torch.isfinite(value).all()
    ]
    if bad:
        return (
            f"loss is {loss} at step {step}: the batch holds NaN/inf in {bad}; the dataset has non-finite "
            "values in those keys — clean or re-record them (scd-data check lists damaged chunks)"
        )
    return (
        f"loss is {loss} at step {step} although the batch is finite: the optimisation diverged; lower "
        "train.lr (or raise train.warmup_steps) and start again"
    )


def train(cfg: ExperimentConfig, run_dir: Path, rollout_fn: RolloutFn | None = None) -> Path:
    """Train a policy; returns the path of the final deployable (EMA) policy folder."""
    tcfg = cfg.train
    device = resolve_device(tcfg.device)
    dist_info = init_distributed(device.type)
    try:
        return _train(cfg, run_dir, device, dist_info, rollout_fn)
    finally:
        shutdown(dist_info)


def _train(
    cfg: ExperimentConfig,
    run_dir: Path,
    device: torch.device,
    dist_info: DistInfo,
    rollout_fn: RolloutFn | None,
) -> Path:
    tcfg = cfg.train
    if tcfg.num_threads is not None:
        torch.set_num_threads(tcfg.num_threads)
    torch.manual_seed(tcfg.seed + dist_info.rank)
    if dist_info.is_main:
        if not tcfg.resume:
            ensure_new_run_folder(run_dir)  # before anything is written: two runs never share a folder
        prepare_run_folder(run_dir)

    # ---- data, normaliser and policy ------------------------------------------------------------
    train_set, val_set, buffer = make_datasets(cfg.data, cfg.policy)
    shapes = input_shapes(buffer, cfg.data.obs_keys)
    action_dim = dataset_action_dim(buffer, cfg.data.action_key)
    policy_cfg = dataclasses.replace(cfg.policy, input_shapes=shapes, action_dim=action_dim)
    modes = {key: normalizer_mode(shape) for key, shape in shapes.items()}
    modes[cfg.data.action_key] = "min_max"
    normalizer = fit_normalizer(buffer, train_set.episode_ids, modes, rename={cfg.data.action_key: "action"})
    policy = make_policy(policy_cfg, normalizer).to(device)
    cfg = dataclasses.replace(cfg, policy=policy_cfg)
    if tcfg.init_from:  # fine-tuning / distillation; a resumed checkpoint below replaces these weights
        init_weights(policy, Path(tcfg.init_from))
    try:
        frozen = freeze_parameters(policy, tcfg.freeze)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    n_params = sum(p.numel() for p in policy.parameters())
    if frozen and dist_info.is_main:
        log.info("train.freeze=%s: %.2fM parameters frozen", tcfg.freeze, frozen / 1e6)
    if dist_info.is_main:
        log.info(
            "policy %s: %.2fM parameters; world size %d on %s; data %s: %d train / %d val episodes, "
            "%d / %d samples",
            policy_cfg.type,
            n_params / 1e6,
            dist_info.world_size,
            device,
            cfg.data.path,
            len(train_set.episode_ids),
            len(val_set.episode_ids),
            len(train_set),
            len(val_set),
        )

    ema = EMA(policy, tcfg.ema_decay)
    optimizer = torch.optim.AdamW(policy.param_groups(tcfg.lr, tcfg.weight_decay), betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, tcfg.warmup_steps, tcfg.steps)
    )
    state = TrainState(step=0, ema_updates=0, best_success=None)
    if tcfg.resume:
        # Rank 0 alone verifies (and sets aside damaged checkpoints, repointing latest.json); the other
        # ranks then read the pointer it left, so no two processes rename the same folder.
        checkpoint = resumable_checkpoint(run_dir) if dist_info.is_main else None
        barrier(dist_info)
        if not dist_info.is_main:
            checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            log.info("resume=true but %s has no checkpoint yet: starting from step 0", run_dir)
        else:
            state = load_checkpoint(
                checkpoint, model=policy, ema_model=ema.shadow, optimizer=optimizer, scheduler=scheduler
            )
            ema.num_updates = state.ema_updates
            recorded = best_success(run_dir)  # newer than the checkpoint when rollouts ran after it
            if recorded is not None:
                state.best_success = recorded
            log.info("resumed from %s at step %d", checkpoint, state.step)
    if dist_info.is_main:
        # Written only now: a resume whose checkpoint does not fit this config must not overwrite the
        # config the run was trained with.
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))

    model: nn.Module = _LossModule(policy)
    if dist_info.enabled:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    per_rank_batch = max(1, tcfg.batch_size // dist_info.world_size)
    sampler = ResumableShardedSampler(
        len(train_set),
        per_rank_batch,
        seed=tcfg.seed,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        start_batch=state.step,
    )
    batches = _infinite(_make_loader(train_set, per_rank_batch, sampler, tcfg.num_workers))

    writer = None
    if dist_info.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
    use_amp = tcfg.amp and device.type == "cuda"
    progress = tqdm(
        total=tcfg.steps,
        initial=state.step,
        desc=f"train {policy_cfg.type}",
        disable=not dist_info.is_main,
        dynamic_ncols=True,
    )
    window_start, window_samples = time.perf_counter(), 0
    while state.step < tcfg.steps:
        policy.train()
        batch = _to_device(next(batches), device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss, metrics = model(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(non_finite_loss_message(float(loss), state.step, batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), tcfg.grad_clip)
        optimizer.step()
        scheduler.step()
        ema.update(policy)
        state.step += 1
        state.ema_updates = ema.num_updates
        window_samples += per_rank_batch * dist_info.world_size

        if state.step % tcfg.log_every == 0 or state.step == tcfg.steps:
            mean_loss = float(all_reduce_mean(loss.detach(), dist_info))
            elapsed = time.perf_counter() - window_start
            samples_per_s = window_samples / max(elapsed, 1e-9)
            window_start, window_samples = time.perf_counter(), 0
            lr = scheduler.get_last_lr()[0]
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples_per_s:.0f}")
            if writer is not None:
                writer.add_scalar("train/loss", mean_loss, state.step)
                writer.add_scalar("train/lr", lr, state.step)
                writer.add_scalar("train/grad_norm", float(grad_norm), state.step)
                writer.add_scalar("train/samples_per_s", samples_per_s, state.step)
                for key, value in metrics.items():
                    writer.add_scalar(f"train/{key}", value, state.step)
        progress.update(1)

        is_last = state.step == tcfg.steps
        if dist_info.is_main and (state.step % tcfg.val_every == 0 or is_last):
            val = validation_loss(ema.shadow, val_set, per_rank_batch, device)
            log.info("step %d: validation loss (EMA) %.4f", state.step, val)
            if writer is not None:
                writer.add_scalar("val/loss", val, state.step)
        # Checkpoint before the rollouts: a failure there must not cost the steps just trained (the
        # best-so-far success is read back from best.json on resume, see above).
        if dist_info.is_main and (state.step % tcfg.checkpoint_every == 0 or is_last):
            save_checkpoint(
                run_dir,
                model=policy,
                ema_model=ema.shadow,
                optimizer=optimizer,
                scheduler=scheduler,
                state=state,
            )
        if (
            dist_info.is_main
            and rollout_fn is not None
            and ((tcfg.eval_every and state.step % tcfg.eval_every == 0) or is_last)
        ):
            results = rollout_fn(ema.shadow, state.step)
            success = float(results["success_rate"])
            log.info("step %d: rollout success %.1f%%", state.step, 100 * success)
            if writer is not None:
                for key, value in results.items():
                    writer.add_scalar(f"eval/{key}", value, state.step)
            if state.best_success is None or success > state.best_success:
                state.best_success = success
                save_best(run_dir, ema.shadow, state.step, success)
        barrier(dist_info)
    progress.close()
    if writer is not None:
        writer.close()
    final = policy_folder(run_dir, state.step)
    if dist_info.is_main:
        log.info("training done: deployable EMA policy at %s", final)
    return final
