"""Write the golden checkpoints and expected values that ``tests/test_golden.py`` compares against.

Run from the repository root, only to record behaviour deliberately (the refactors these files guard
must leave them unchanged)::

    .venv/bin/python tests/golden/generate.py

For each policy type it builds a ``tiny`` policy over a state + camera input, fits its normaliser on a
small synthetic replay buffer, perturbs every weight (AdaLN-Zero starts as an identity, which would
leave most of the network unexercised), and saves it with ``save_pretrained``. Expected values:
the actions of a 200-step streaming rollout (one stream), of a 2-stream rollout with a mid-episode
reset of one stream, and the training loss on a fixed batch under a fixed seed.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.numpy import save_file as save_numpy

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from scd_policy.config import PolicyConfig, config_dir  # noqa: E402
from scd_policy.data import ReplayBuffer, WindowedDataset, fit_normalizer  # noqa: E402
from scd_policy.policies import make_policy  # noqa: E402

TYPES = ("scd", "causal_diffusion", "diffusion_policy")
STATE_DIM, ACTION_DIM, IMAGE_HW = 4, 2, 16
ROLLOUT_STEPS = 200
RESET_AT = 50  # the 2-stream rollout resets stream 1 at this tick


def policy_config(policy_type: str) -> PolicyConfig:
    tiny = OmegaConf.to_container(OmegaConf.load(config_dir() / "size" / "tiny.yaml"))
    assert isinstance(tiny, dict)
    return PolicyConfig(
        **{str(k): v for k, v in tiny.items()},
        type=policy_type,
        horizon=8,
        n_action_steps=4,
        train_window=4,
        context_window=4,
        n_obs_steps=2,
        input_shapes={"state": [STATE_DIM], "image": [3, IMAGE_HW, IMAGE_HW]},
        action_dim=ACTION_DIM,
    )


def synthetic_buffer(path: Path) -> ReplayBuffer:
    rng = np.random.default_rng(0)
    buffer = ReplayBuffer.create(path)
    for length in (30, 25, 40):
        buffer.append_episode(
            {
                "state": rng.uniform(-1, 1, (length, STATE_DIM)).astype(np.float32),
                "image": rng.integers(0, 256, (length, IMAGE_HW, IMAGE_HW, 3), dtype=np.uint8),
                "action": rng.uniform(-0.5, 0.5, (length, ACTION_DIM)).astype(np.float32),
            }
        )
    return buffer


def observations(steps: int, streams: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    state = rng.uniform(-1, 1, (steps, streams, STATE_DIM)).astype(np.float32)
    image = rng.integers(0, 256, (steps, streams, IMAGE_HW, IMAGE_HW, 3), dtype=np.uint8)
    return state, image


def rollout(policy: Any, streams: int) -> np.ndarray:
    from scd_policy.runtime import PolicyRuntime

    runtime = PolicyRuntime(policy, num_envs=streams, seed=0)
    state, image = observations(ROLLOUT_STEPS, streams)
    actions = []
    for tick in range(ROLLOUT_STEPS):
        if streams > 1 and tick == RESET_AT:
            runtime.reset(np.array([False, True]))
        obs = {"state": state[tick], "image": image[tick]}
        if streams == 1:
            obs = {key: value[0] for key, value in obs.items()}
        actions.append(runtime.step(obs).reshape(streams, ACTION_DIM))
    return np.stack(actions)  # (steps, streams, Da)


def main() -> None:
    torch.set_num_threads(1)
    expected: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        buffer = synthetic_buffer(Path(tmp) / "buffer.zarr")
        for policy_type in TYPES:
            cfg = policy_config(policy_type)
            torch.manual_seed(0)
            normalizer = fit_normalizer(
                buffer, [0, 1, 2], {"state": "min_max", "image": "image", "action": "min_max"}
            )
            policy = make_policy(cfg, normalizer)
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for param in policy.parameters():
                    param.add_(0.05 * torch.randn(param.shape, generator=generator))
            folder = HERE / policy_type
            policy.save_pretrained(folder)

            dataset = WindowedDataset(
                buffer, [0, 1, 2], ["image", "state"], cfg.observation_offsets, cfg.action_offsets
            )
            samples = [dataset[i] for i in (0, 7, 19, 33, 48, 60)]
            batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
            save_numpy(
                {key: value.numpy() for key, value in batch.items()}, str(folder / "batch.safetensors")
            )
            policy.train()
            torch.manual_seed(123)
            loss, _ = policy.compute_loss(batch)
            policy.eval()
            single = rollout(policy, 1)
            double = rollout(policy, 2)
            save_numpy({"single": single, "double": double}, str(folder / "rollout.safetensors"))
            expected[policy_type] = {"loss": float(loss.detach())}
            print(f"{policy_type}: loss {float(loss.detach()):.6f}, actions {single.shape} {double.shape}")
    (HERE / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")


if __name__ == "__main__":
    main()
