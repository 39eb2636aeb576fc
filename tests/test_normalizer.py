"""The normaliser: hand-computed statistics, round trips, constant dimensions, state_dict, errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from scd_policy.data.replay_buffer import ReplayBuffer
from scd_policy.data.statistics import fit_normalizer
from scd_policy.models.normalizer import Normalizer

BufferFactory = Callable[..., Path]  # fixture from conftest.py: episodes whose values encode the step


def test_min_max_maps_data_to_unit_range_and_constant_dims_to_zero() -> None:
    x = torch.tensor([[0.0, 5.0, 3.0], [2.0, 5.0, -1.0], [4.0, 5.0, 1.0]])
    # min [0, 5, -1], max [4, 5, 3] -> centre [2, 5, 1], half-range [2, (0 -> 1), 2]
    norm = Normalizer.fit({"state": x}, {"state": "min_max"})
    expected = torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(norm.normalize("state", x), expected)
    torch.testing.assert_close(norm.unnormalize("state", expected), x)
    # A value off the constant dimension stays finite and inverts exactly.
    off = torch.tensor([[2.0, 7.0, 1.0]])
    torch.testing.assert_close(norm.normalize("state", off), torch.tensor([[0.0, 2.0, 0.0]]))
    torch.testing.assert_close(norm.unnormalize("state", norm.normalize("state", off)), off)


def test_mean_std() -> None:
    x = np.array([[1.0, 7.0], [3.0, 7.0]], dtype=np.float32)  # mean [2, 7], std [1, 0 -> 1]
    norm = Normalizer.fit({"action": x}, {"action": "mean_std"})
    out = norm.normalize("action", torch.from_numpy(x))
    torch.testing.assert_close(out, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    # Leading batch/time dims broadcast: (B=2, T=3, D=2).
    batch = torch.from_numpy(x)[None].expand(3, 2, 2).permute(1, 0, 2)
    assert norm.normalize("action", batch).shape == (2, 3, 2)
    torch.testing.assert_close(norm.unnormalize("action", norm.normalize("action", batch)), batch)


def test_all_constant_data_gives_no_nan() -> None:
    x = torch.full((4, 3), 2.5)
    for mode in ("min_max", "mean_std"):
        norm = Normalizer.fit({"k": x}, {"k": mode})
        out = norm.normalize("k", x)
        assert torch.isfinite(out).all() and torch.equal(out, torch.zeros(4, 3))
        torch.testing.assert_close(norm.unnormalize("k", out), x)


def test_image_mode_needs_no_stats() -> None:
    norm = Normalizer({"image": [3, 2, 2]}, {"image": "image"})
    frames = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1).expand(5, 3, 2, 2)  # (T, C, H, W)
    out = norm.normalize("image", frames)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(norm.unnormalize("image", out), frames)


def test_per_channel_stats_for_images() -> None:
    # (N=2, C=2, H=1, W=2): channel 0 holds 0, 2, 4, 6 (mean 3, std sqrt(5)), channel 1 holds 1 everywhere.
    x = torch.tensor([[[[0.0, 2.0]], [[1.0, 1.0]]], [[[4.0, 6.0]], [[1.0, 1.0]]]])
    norm = Normalizer.fit({"image": x}, {"image": "mean_std"})
    out = norm.normalize("image", x)
    expected_c0 = (torch.tensor([[0.0, 2.0], [4.0, 6.0]]) - 3.0) / 5.0**0.5
    torch.testing.assert_close(out[:, 0, 0, :], expected_c0)
    torch.testing.assert_close(out[:, 1], torch.zeros(2, 1, 2))
    assert dict(norm.state_dict())["stats.image.offset"].shape == (2, 1, 1)


def test_state_dict_round_trip_before_fitting() -> None:
    shapes, modes = (
        {"state": [2], "action": [3], "image": [3, 4, 4]},
        {
            "state": "min_max",
            "action": "mean_std",
            "image": "image",
        },
    )
    rng = np.random.default_rng(0)
    data = {
        "state": rng.normal(size=(50, 2)),
        "action": rng.normal(size=(50, 3)),
        "image": np.zeros((1, 3, 4, 4)),
    }
    fitted = Normalizer.fit(data, modes)
    fresh = Normalizer(shapes, modes)
    with pytest.raises(RuntimeError, match="not fitted"):
        fresh.normalize("state", torch.zeros(2))
    fresh.load_state_dict(fitted.state_dict())
    x = torch.randn(7, 3)
    torch.testing.assert_close(fresh.normalize("action", x), fitted.normalize("action", x))
    torch.testing.assert_close(fresh.unnormalize("state", x[:, :2]), fitted.unnormalize("state", x[:, :2]))
    assert fresh.keys == ["state", "action", "image"] and fresh.modes == modes


def test_keys_with_dots_and_normalize_batch() -> None:
    norm = Normalizer.fit(
        {"observation.state": torch.tensor([[0.0], [2.0]])}, {"observation.state": "min_max"}
    )
    batch = {"observation.state": torch.tensor([[[2.0]]]), "obs_is_pad": torch.tensor([[True]])}
    out = norm.normalize_batch(batch)
    torch.testing.assert_close(out["observation.state"], torch.tensor([[[1.0]]]))
    assert out["obs_is_pad"] is batch["obs_is_pad"]
    with pytest.raises(KeyError, match=r"'reward'.*known keys: \['observation.state'\]"):
        norm.normalize_batch({**batch, "reward": torch.zeros(1)})


def test_errors() -> None:
    norm = Normalizer.fit({"state": torch.zeros(3, 2)}, {"state": "min_max"})
    with pytest.raises(KeyError, match=r"no key 'action'; known keys: \['state'\]"):
        norm.normalize("action", torch.zeros(2))
    with pytest.raises(ValueError, match=r"'state': expected a tensor \(\.\.\., 2\), got \(4, 3\)"):
        norm.unnormalize("state", torch.zeros(4, 3))
    with pytest.raises(ValueError, match="mode 'zscore'"):
        Normalizer({"state": [2]}, {"state": "zscore"})
    with pytest.raises(KeyError, match="same keys"):
        Normalizer({"state": [2]}, {"action": "min_max"})
    with pytest.raises(ValueError, match=r"mode 'image' but shape \(2,\)"):
        Normalizer({"state": [2]}, {"state": "image"})
    with pytest.raises(KeyError, match=r"no data for normaliser keys \['action'\]"):
        Normalizer.fit({"state": torch.zeros(3, 2)}, {"action": "min_max"})


def test_fit_normalizer_uses_only_the_given_episodes(make_buffer: BufferFactory) -> None:
    buffer = ReplayBuffer.open(make_buffer([3, 5, 2]))
    # Episodes 0 and 2 hold steps 0, 1, 2, 8, 9: state = [g, 10 g] -> min [0, 0], max [9, 90].
    norm = fit_normalizer(buffer, [0, 2], {"state": "min_max", "action": "mean_std", "image": "image"})
    assert norm.shapes == {"state": (2,), "action": (2,), "image": (3, 4, 4)}
    torch.testing.assert_close(norm.normalize("state", torch.tensor([9.0, 0.0])), torch.tensor([1.0, -1.0]))
    # action = [g + 0.5, -g] over g in {0, 1, 2, 8, 9}: mean [4.5, -4]; deviations -4, -3, -2, 4, 5
    # -> population variance 70 / 5 = 14 in both columns.
    out = norm.normalize("action", torch.tensor([4.5 + 14.0**0.5, -4.0 - 2 * 14.0**0.5]))
    torch.testing.assert_close(out, torch.tensor([1.0, -2.0]))
    # Image keys in a statistics mode get per-channel statistics from the stored frames (scaled to [0, 1]).
    image_norm = fit_normalizer(buffer, [0], {"image": "min_max"})
    # Episode 0: channel c spans (10 g + c) / 255 for g in 0..2 -> centre (10 + c) / 255, half-range 10 / 255.
    frame = torch.tensor([20.0, 21.0, 22.0]).view(3, 1, 1).expand(3, 4, 4) / 255.0
    torch.testing.assert_close(image_norm.normalize("image", frame), torch.ones(3, 4, 4))
    with pytest.raises(KeyError, match=r"\['depth'\] are not in"):
        fit_normalizer(buffer, [0], {"depth": "min_max"})
