"""Does a backend compute what torch computes? Both stream the same random episode; compare actions."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from scd_policy.backends.engine import StepEngine
from scd_policy.conventions import is_policy_image
from scd_policy.policies.scd import SeparableCausalDiffusionPolicy


def random_episode(
    shapes: dict[str, list[int]], steps: int, num_envs: int, seed: int
) -> list[dict[str, npt.NDArray[np.generic]]]:
    """``steps`` ticks of observations for ``num_envs`` streams: N(0, 1) state vectors, uint8 HWC images."""
    rng = np.random.default_rng(seed)
    episode = []
    for _ in range(steps):
        obs: dict[str, npt.NDArray[np.generic]] = {}
        for key, shape in shapes.items():
            if is_policy_image(shape):
                c, h, w = shape
                obs[key] = rng.integers(0, 256, size=(num_envs, h, w, c), dtype=np.uint8)
            else:
                obs[key] = rng.normal(0.0, 1.0, size=(num_envs, *shape)).astype(np.float32)
        episode.append(obs)
    return episode


def stream_difference(
    policy: SeparableCausalDiffusionPolicy,
    engine: StepEngine,
    *,
    steps: int = 50,
    num_envs: int = 2,
    seed: int = 0,
) -> float:
    """The largest |action difference| between the torch path and ``engine`` over ``steps`` ticks of a
    random episode for ``num_envs`` streams, replanning at every tick (every tick runs the encoder and K
    decoder calls), with stream 0 reset half-way (a masked cache). The policy's engine is left as it
    was."""
    from scd_policy.runtime import PolicyRuntime  # the runtime imports backends

    episode = random_episode(policy.config.input_shapes, steps, num_envs, seed)
    before = policy.engine
    actions: list[npt.NDArray[np.float32]] = []
    try:
        for current in (None, engine):
            policy.engine = current
            runtime = PolicyRuntime(policy, num_envs=num_envs, n_action_steps=1, seed=seed)
            run = []
            with torch.inference_mode():
                for tick, obs in enumerate(episode):
                    if tick == steps // 2:
                        runtime.reset(np.arange(num_envs) == 0)
                    run.append(runtime.step(obs if num_envs > 1 else {k: v[0] for k, v in obs.items()}))
            actions.append(np.stack(run))
    finally:
        policy.engine = before
    return float(np.abs(actions[0] - actions[1]).max())
