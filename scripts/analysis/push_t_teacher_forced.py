"""One-step imitation error of a trained policy on the expert's own states (teacher forcing).

The expert drives the env; at every step the policy (replanning every step) is asked for its action
in the same state, and the distance between the two pusher targets is recorded, in metres and
relative to the expert's step |target - pusher|. Large errors on the expert's own states mean the
policy has not learnt the expert's map; small ones point to closed-loop drift instead.

    .venv/bin/python scripts/analysis/push_t_teacher_forced.py --checkpoint runs/x --episodes 10
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from envs.registry import make_env, make_expert
from envs.tasks.push_t import PushTEnv, distance_to_t
from scd_policy.policies import load_policy
from scd_policy.runtime import PolicyRuntime
from scd_policy.training.checkpoint import resolve_policy_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--seed0", type=int, default=500_000)  # never in a training set collected from 0
    args = ap.parse_args()
    torch.set_num_threads(1)
    policy = load_policy(resolve_policy_dir(Path(args.checkpoint)), device="cpu")
    runtime = PolicyRuntime(policy, num_envs=1, n_action_steps=1, seed=0)
    env = make_env("push_t")
    errs, steps, holds, contact = [], [], [], []
    inner = env.unwrapped
    assert isinstance(inner, PushTEnv)
    for i in range(args.episodes):
        expert = make_expert("push_t", args.seed0 + i)
        obs, info = env.reset(seed=args.seed0 + i)
        runtime.reset()
        done = False
        while not done:
            a = np.asarray(expert(obs, info), np.float32)
            p = runtime.step({"state": obs["state"][None]})[0]
            here = obs["state"][:2] / 0.25
            errs.append(float(np.linalg.norm(p - a)) * 0.25)
            steps.append(float(np.linalg.norm(a - here)) * 0.25)
            holds.append(float(np.linalg.norm(p - here)) * 0.25)
            gap = distance_to_t(obs["state"][:2], inner.block_pose, inner.geometry)
            contact.append(gap < inner.geometry.pusher_radius + 0.004)
            obs, _, term, trunc, info = env.step(a)
            done = term or trunc
    env.close()
    e, s, c = np.array(errs), np.array(steps), np.array(contact)
    print(
        json.dumps(
            {
                "err_mean_m": float(e.mean()),
                "err_p90_m": float(np.percentile(e, 90)),
                "expert_step_mean_m": float(s.mean()),
                "err_rel_step": float(e.mean() / s.mean()),
                "policy_step_mean_m": float(np.mean(holds)),
                "contact_frac": float(c.mean()),
                "err_rel_step_in_contact": float(e[c].mean() / s[c].mean()),
                "err_rel_step_travelling": float(e[~c].mean() / s[~c].mean()),
                "step_in_contact_m": float(s[c].mean()),
                "step_travelling_m": float(s[~c].mean()),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
