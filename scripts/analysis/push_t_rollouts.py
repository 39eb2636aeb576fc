"""What does a trained push_t policy do, next to the expert on the same seeds?

Per episode it records coverage over time, whether the pusher touches the block, how far it moves
per step, and summarises: best / final coverage, coverage at fixed times, the fraction of steps in
contact, "stalled" steps (pusher moves < 2 mm and the block does not move), and the step at which
the best coverage was first reached (late bests = the episode limit is what stopped it).

    .venv/bin/python scripts/analysis/push_t_rollouts.py --checkpoint runs/x --episodes 30 \
        --max-steps 300 [--expert]

Seeds are the evaluation seeds of scd-eval's seed 0, so the numbers line up with eval.json.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from envs.registry import make_env
from envs.tasks.push_t import PushTEnv, distance_to_t, make_expert
from scd_policy.evaluation import EVAL_SEED_BASE

CHECK_STEPS = (25, 50, 110, 200, 300)


def run_episode(env: Any, act: Any, seed: int, max_steps: int) -> dict[str, Any]:
    obs, info = env.reset(seed=seed)
    inner: PushTEnv = env.unwrapped
    cov, contact, move, block_move = [], [], [], []
    prev = obs["state"].copy()
    for _ in range(max_steps):
        action = act(obs, info)
        obs, _, terminated, truncated, info = env.step(action)
        s = obs["state"]
        cov.append(float(info["coverage"]))
        contact.append(
            distance_to_t(s[:2], inner.block_pose, inner.geometry) < inner.geometry.pusher_radius + 0.002
        )
        move.append(float(np.linalg.norm(s[:2] - prev[:2])))
        block_move.append(
            float(np.linalg.norm(s[2:4] - prev[2:4]))
            + 0.05
            * abs(math.atan2(float(s[5] * prev[4] - s[4] * prev[5]), float(s[4] * prev[4] + s[5] * prev[5])))
        )
        prev = s.copy()
        if terminated or truncated:
            break
    c = np.array(cov)
    stalled = (np.array(move) < 0.002) & (np.array(block_move) < 0.0005)
    return {
        "success": bool(info["success"]),
        "length": len(c),
        "best": float(c.max()),
        "final": float(c[-1]),
        "start": float(c[0]),
        "argbest": int(c.argmax()),
        # Coverage at fixed times, carrying the last value of an episode that ended earlier.
        "at": {t: float(c[min(t, len(c)) - 1]) for t in CHECK_STEPS},
        "contact_frac": float(np.mean(contact)),
        "stall_frac": float(np.mean(stalled)),
    }


def summarise(eps: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "episodes": len(eps),
        "success": float(np.mean([e["success"] for e in eps])),
        "best": float(np.mean([e["best"] for e in eps])),
        "final": float(np.mean([e["final"] for e in eps])),
        "start": float(np.mean([e["start"] for e in eps])),
        "length_mean": float(np.mean([e["length"] for e in eps])),
        "contact_frac": float(np.mean([e["contact_frac"] for e in eps])),
        "stall_frac": float(np.mean([e["stall_frac"] for e in eps])),
        "argbest_mean": float(np.mean([e["argbest"] for e in eps])),
    }
    for t in CHECK_STEPS:
        out[f"cov@{t}"] = float(np.mean([e["at"][t] for e in eps]))
        out[f"success_by_{t}"] = float(np.mean([e["success"] and e["length"] <= t for e in eps]))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--expert", action="store_true", help="roll out the scripted expert instead")
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    env = make_env("push_t", max_episode_steps=args.max_steps)
    seeds = [EVAL_SEED_BASE + i for i in range(args.episodes)]  # scd-eval's episodes of seed 0
    eps = []
    if args.expert:
        for seed in seeds:
            expert = make_expert(seed)
            eps.append(
                run_episode(env, lambda o, i, e=expert: np.asarray(e(o, i), np.float32), seed, args.max_steps)
            )
    else:
        from scd_policy.policies import load_policy
        from scd_policy.runtime import PolicyRuntime
        from scd_policy.training.checkpoint import resolve_policy_dir

        policy = load_policy(resolve_policy_dir(Path(args.checkpoint)), device="cpu")
        runtime = PolicyRuntime(policy, num_envs=1, seed=0)
        keys = list(policy.config.input_shapes)
        for seed in seeds:
            runtime.reset()

            def act(o: dict[str, np.ndarray], _i: dict[str, Any]) -> np.ndarray:
                batch = {k: o[k][None] for k in keys}
                return np.asarray(runtime.step(batch)[0], np.float32)

            eps.append(run_episode(env, act, seed, args.max_steps))
    env.close()
    summary = summarise(eps)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "episodes": eps}, f, indent=1)


if __name__ == "__main__":
    main()
