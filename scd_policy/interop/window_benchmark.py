"""Time random training-window reads: a LeRobotDataset (its own loader) against our converted zarr buffer.

    python -m scd_policy.interop.window_benchmark --repo-id local/x --root DIR --zarr path.zarr

Both sides load the windows an SCD policy trains on (``PolicyConfig.observation_offsets`` /
``action_offsets`` for ``--window`` and ``--horizon``) at the same random anchors; docs/lerobot.md
quotes the ratio as the reason to convert before training. Needs LeRobot (``.venv-lerobot``).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scd_policy.config import PolicyConfig
from scd_policy.data.dataset import WindowedDataset
from scd_policy.data.replay_buffer import ReplayBuffer
from scd_policy.interop.lerobot_convert import read_info


def _per_sample_ms(get: Callable[[int], Any], anchors: np.ndarray) -> float:
    get(int(anchors[0]))  # warm-up: open files, build decoders
    start = time.perf_counter()
    for anchor in anchors:
        get(int(anchor))
    return 1000.0 * (time.perf_counter() - start) / len(anchors)


def run(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--root", required=True, help="the LeRobot dataset folder")
    parser.add_argument("--zarr", required=True, help="the same data converted with scd-convert from-lerobot")
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--horizon", type=int, default=16)
    parser.add_argument("--samples", type=int, default=100)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lerobot.datasets.lerobot_dataset import LeRobotDataset  # optional dependency

    cfg = PolicyConfig(type="scd", train_window=args.window, horizon=args.horizon, context_window=args.window)
    info = read_info(Path(args.root))
    fps = float(info["fps"])
    observations = [key for key in info["features"] if key.startswith("observation.")]
    deltas = {key: [o / fps for o in cfg.observation_offsets] for key in observations}
    deltas["action"] = [o / fps for o in cfg.action_offsets]
    theirs = LeRobotDataset(args.repo_id, root=args.root, delta_timestamps=deltas)
    buffer = ReplayBuffer.open(args.zarr)
    obs_keys = [key for key in buffer.keys if key != "action"]
    ours = WindowedDataset(
        buffer, np.arange(buffer.n_episodes), obs_keys, cfg.observation_offsets, cfg.action_offsets
    )
    if buffer.n_steps != len(theirs):
        raise SystemExit(
            f"{args.zarr} holds {buffer.n_steps} steps but {args.root} {len(theirs)}: not the same data"
        )
    samples = np.random.default_rng(0).integers(0, len(ours), size=args.samples)
    # The same windows on both sides: LeRobot indexes frames by global step, ours by sample.
    result = {
        "lerobot_ms_per_window": _per_sample_ms(theirs.__getitem__, ours.anchors[samples]),
        "zarr_ms_per_window": _per_sample_ms(ours.__getitem__, samples),
    }
    result["ratio"] = result["lerobot_ms_per_window"] / result["zarr_ms_per_window"]
    print(
        f"{args.samples} random windows (W={args.window}, H={args.horizon}, keys {obs_keys}): LeRobotDataset "
        f"{result['lerobot_ms_per_window']:.1f} ms, zarr {result['zarr_ms_per_window']:.2f} ms per window "
        f"({result['ratio']:.0f}x)"
    )
    return result


def main() -> None:
    run()


if __name__ == "__main__":
    main()
