"""Unit tests of the training pieces: schedule, resumable sampler, EMA, atomic writes, validation loss."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from scd_policy.config import PolicyConfig
from scd_policy.data.dataset import WindowedDataset
from scd_policy.data.replay_buffer import ReplayBuffer
from scd_policy.data.statistics import fit_normalizer
from scd_policy.io import atomic_directory, atomic_write_text
from scd_policy.policies import make_policy
from scd_policy.training.ema import EMA
from scd_policy.training.sampler import ResumableShardedSampler
from scd_policy.training.schedule import warmup_cosine
from scd_policy.training.trainer import validation_loss


def test_warmup_cosine_hand_computed() -> None:
    # 4 warm-up steps reach the peak linearly, then a half cosine over the remaining 8 steps.
    assert [warmup_cosine(s, 4, 12) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(4, 4, 12) == pytest.approx(1.0)
    assert warmup_cosine(8, 4, 12) == pytest.approx(0.5)  # half-way through the decay
    assert warmup_cosine(12, 4, 12) == pytest.approx(0.0)
    assert warmup_cosine(20, 4, 12) == pytest.approx(0.0)  # stays at the floor past the end
    assert warmup_cosine(12, 4, 12, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(0, 0, 10) == pytest.approx(1.0)  # no warm-up


def test_sampler_resumes_exactly_and_shards_disjointly() -> None:
    full = list(itertools.islice(iter(ResumableShardedSampler(10, 3, seed=5)), 30))
    # Epoch e is a permutation of the dataset drawn from seed + e.
    assert sorted(full[:10]) == list(range(10)) and sorted(full[10:20]) == list(range(10))
    assert full[:10] != full[10:20]
    # Resuming after 4 batches of 3 continues the same stream, across the epoch boundary.
    resumed = list(itertools.islice(iter(ResumableShardedSampler(10, 3, seed=5, start_batch=4)), 18))
    assert resumed == full[12:30]
    # Two ranks: the same per-rank count, disjoint within an epoch, covering the dataset.
    rank0 = list(itertools.islice(iter(ResumableShardedSampler(10, 2, seed=5, rank=0, world_size=2)), 5))
    rank1 = list(itertools.islice(iter(ResumableShardedSampler(10, 2, seed=5, rank=1, world_size=2)), 5))
    assert set(rank0).isdisjoint(rank1) and sorted(rank0 + rank1) == list(range(10))
    with pytest.raises(ValueError, match="empty dataset"):
        ResumableShardedSampler(0, 2)


def test_ema_warms_up_then_tracks_with_the_configured_decay() -> None:
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # decay = min(0.9, 2 / 11): the average moves 9/11 of the way
    assert float(ema.shadow.weight) == pytest.approx(9 / 11)
    for _ in range(200):
        ema.update(model)
    assert float(ema.shadow.weight) == pytest.approx(1.0, abs=1e-6)
    assert not ema.shadow.weight.requires_grad  # the shadow is never optimised


def test_atomic_directory_keeps_the_old_folder_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError, match="disk full"), atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("half-written")
        raise RuntimeError("disk full")
    assert (target / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left behind
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("second")
    assert (target / "a.txt").read_text() == "second"
    atomic_write_text(tmp_path / "x.json", "{}")
    assert (tmp_path / "x.json").read_text() == "{}"


def test_validation_loss_uses_a_split_smaller_than_one_batch(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    writer = ReplayBuffer.create(tmp_path / "buf.zarr")
    for _ in range(2):
        writer.append_episode(
            {
                "state": rng.normal(size=(6, 3)).astype(np.float32),
                "action": rng.normal(size=(6, 2)).astype(np.float32),
            }
        )
    buffer = ReplayBuffer.open(tmp_path / "buf.zarr")
    config = PolicyConfig(
        type="scd",
        d_model=32,
        n_heads=2,
        encoder_layers=1,
        decoder_layers=1,
        horizon=4,
        n_action_steps=2,
        train_window=4,
        context_window=4,
        input_shapes={"state": [3]},
        action_dim=2,
    )
    normalizer = fit_normalizer(buffer, [0, 1], {"state": "min_max", "action": "min_max"})
    policy = make_policy(config, normalizer)
    dataset = WindowedDataset(buffer, [0, 1], ["state"], config.observation_offsets, config.action_offsets)
    assert len(dataset) == 6  # 3 anchors per 6-step episode: fewer samples than the batch below
    loss = validation_loss(policy, dataset, batch_size=32, device=torch.device("cpu"))
    assert math.isfinite(loss) and loss > 0
    # Fixed noise: the same value twice, and the global RNG is left alone.
    state = torch.get_rng_state()
    assert validation_loss(policy, dataset, batch_size=32, device=torch.device("cpu")) == loss
    assert torch.equal(torch.get_rng_state(), state)
