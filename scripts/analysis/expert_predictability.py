"""How well is a scripted expert's action predictable from what a policy sees?

Issue H: every policy fails push_t although the expert is at 100%. A policy that sees the last ``k``
observations (and previous actions) can only imitate the expert if the expert's action is (close to)
a function of that window. This script measures it two ways, on freshly rolled-out expert episodes:

1. **Decision audit** (push_t only): at every step, compare the expert's action with the action of a
   *memoryless, noise-free* copy of the same expert given only the current state (its hidden
   ``_target`` / ``_angle_sign`` cleared). The gap is what no observation window can explain unless
   the hidden decision shows in the history; it also counts how often the chosen contact changes.
2. **Regression**: fit a small MLP from the window (last ``k`` states, optionally the ``k`` previous
   actions) to the next action and to the whole 16-step chunk, on held-out episodes. Errors are in
   metres of pusher target, relative to the expert's mean step (|target - pusher|).

    .venv/bin/python scripts/analysis/expert_predictability.py --task push_t --episodes 100 \
        --variant legacy --windows 1 2 8 32

Runs on one thread (the machine is shared); ~1 min per window on 100 push_t episodes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from envs.registry import get_task, make_env, make_expert

CHUNK = 16


# ---- expert variants ---------------------------------------------------------------------------
def _push_t_variant(name: str, seed: int) -> Any:
    from envs.tasks import push_t

    params = push_t.ExpertParams()
    if name == "default":  # what the task ships: state-only since issue H
        return push_t.make_expert(seed)
    if name == "legacy":  # the expert before issue H: per-step score noise and remembered decisions
        return push_t.PushTExpert(seed, dataclasses.replace(params, score_noise=0.03, stateless=False))
    if name == "no_noise":  # remembered decisions, no noise
        return push_t.PushTExpert(seed, dataclasses.replace(params, score_noise=0.0, stateless=False))
    if name == "memoryless":  # no noise, every decision from the current state (= today's default)
        return push_t.PushTExpert(seed, dataclasses.replace(params, score_noise=0.0, stateless=True))
    raise ValueError(f"unknown push_t variant {name!r}")


def build_expert(task: str, variant: str, seed: int) -> Any:
    if task == "push_t":
        return _push_t_variant(variant, seed)
    if variant != "default":
        raise ValueError(f"task {task!r} has only the 'default' variant here")
    return make_expert(task, seed)


# ---- rollouts ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Rollouts:
    states: list[np.ndarray]  # per episode (T, Ds)
    actions: list[np.ndarray]  # per episode (T, Da)
    successes: list[bool]
    audit: dict[str, float]


def _memoryless_action(expert: Any, obs: dict[str, np.ndarray], step: int) -> np.ndarray:
    """The push_t expert's action from the current state alone: no hidden decision, no noise."""
    probe = copy.copy(expert)
    probe.params = dataclasses.replace(expert.params, score_noise=0.0, stateless=True)
    probe._rng = np.random.default_rng(0)  # a private stream: the real expert's is left untouched
    probe._target = None
    probe._angle_sign = 0.0
    action: np.ndarray = probe(obs, {"steps": max(step, 1)})
    return action


def rollout(
    task: str, variant: str, episodes: int, seed0: int, max_steps: int | None, audit: bool
) -> Rollouts:
    env = make_env(task, max_episode_steps=max_steps)
    states, actions, successes = [], [], []
    gaps: list[float] = []
    switches = 0
    decisions = 0
    steps_total = 0
    workspace = 0.25
    for i in range(episodes):
        seed = seed0 + i
        expert = build_expert(task, variant, seed)
        obs, info = env.reset(seed=seed)
        ep_s, ep_a = [], []
        last_target: int | None = None
        while True:
            if audit:
                ref = _memoryless_action(expert, obs, int(info["steps"]))
            action = np.clip(np.asarray(expert(obs, info), dtype=np.float32), -1.0, 1.0)
            if audit:
                gaps.append(float(np.linalg.norm(ref - action)) * workspace)
                target = expert._target
                # A change of contact *face* is a decision; sliding along one face is not.
                if (
                    target is not None
                    and last_target is not None
                    and expert.contacts.face[target] != expert.contacts.face[last_target]
                ):
                    switches += 1
                if target is not None:
                    decisions += int(last_target is None)
                    last_target = target
            ep_s.append(np.asarray(obs["state"], dtype=np.float32))
            ep_a.append(action)
            obs, _, terminated, truncated, info = env.step(action)
            steps_total += 1
            if terminated or truncated:
                break
        states.append(np.stack(ep_s))
        actions.append(np.stack(ep_a))
        successes.append(bool(info["success"]))
    env.close()
    out: dict[str, float] = {}
    if audit:
        g = np.array(gaps)
        out = {
            "memoryless_gap_mean_m": float(g.mean()),
            "memoryless_gap_p90_m": float(np.percentile(g, 90)),
            "frac_steps_gap_over_5mm": float((g > 0.005).mean()),
            "face_switches_per_episode": switches / episodes,
        }
    return Rollouts(states, actions, successes, out)


# ---- windows and regression -----------------------------------------------------------------------
def windows(
    ro: Rollouts, k: int, prev_actions: bool, pusher_slice: slice, scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features (N, F), chunk targets relative to the current pusher (N, CHUNK, Da) and episode ids."""
    feats, targets, ids = [], [], []
    for e, (s, a) in enumerate(zip(ro.states, ro.actions, strict=True)):
        t_len = len(s)
        # Before the episode start: repeat the first state; the "previous action" holds the start pose.
        s_pad = np.concatenate([np.repeat(s[:1], k - 1, axis=0), s])
        start_a = s[:1, pusher_slice] / scale
        a_prev = np.concatenate([np.repeat(start_a, k, axis=0), a])  # a_prev[t + k - 1] = a[t - 1]
        a_future = np.concatenate([a, np.repeat(a[-1:], CHUNK, axis=0)])
        for t in range(t_len):
            window = s_pad[t : t + k]
            here = s[t, pusher_slice] / scale
            f = [window.reshape(-1)]
            if prev_actions:
                f.append((a_prev[t : t + k] - here).reshape(-1))  # relative: what matters is the offset
            feats.append(np.concatenate(f))
            targets.append(a_future[t : t + CHUNK] - here)
            ids.append(e)
    return np.asarray(feats, np.float32), np.asarray(targets, np.float32), np.asarray(ids)


def fit_mlp(
    x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray, seed: int, steps: int, width: int
) -> nn.Module:
    torch.manual_seed(seed)
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    y_sd = float(y_tr.std()) + 1e-9
    net = nn.Sequential(
        nn.Linear(x_tr.shape[1], width),
        nn.GELU(),
        nn.Linear(width, width),
        nn.GELU(),
        nn.Linear(width, width),
        nn.GELU(),
        nn.Linear(width, y_tr.shape[1]),
    )
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    xt = torch.from_numpy((x_tr - mu) / sd)
    yt = torch.from_numpy(y_tr / y_sd)
    xv = torch.from_numpy((x_va - mu) / sd)
    yv = torch.from_numpy(y_va / y_sd)
    best, best_state = math.inf, copy.deepcopy(net.state_dict())
    gen = torch.Generator().manual_seed(seed)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(steps):
        idx = torch.randint(0, len(xt), (256,), generator=gen)
        loss = nn.functional.mse_loss(net(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 99:
            with torch.no_grad():
                v = float(nn.functional.mse_loss(net(xv), yv))
            if v < best:  # early stopping on held-out episodes: the window may be big, the data small
                best, best_state = v, copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)

    class Wrapped(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return net((x - torch.from_numpy(mu)) / torch.from_numpy(sd)) * y_sd

    return Wrapped()


def regression(
    ro: Rollouts,
    k: int,
    prev_actions: bool,
    seed: int,
    steps: int = 4000,
    width: int = 256,
    absolute: bool = False,
) -> dict[str, float]:
    spec_scale = 0.25
    x, y, ids = windows(ro, k, prev_actions, slice(0, 2), spec_scale)
    y = y.reshape(len(y), -1)
    n_ep = len(ro.states)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_ep)
    test_eps, val_eps = set(order[: n_ep // 5]), set(order[n_ep // 5 : n_ep // 5 + n_ep // 10])
    te = np.array([i in test_eps for i in ids])
    va = np.array([i in val_eps for i in ids])
    tr = ~(te | va)
    # absolute: the network outputs the target itself (as the policies do), not its offset from the
    # pusher; the error is measured the same way, so only the output's scale differs.
    here = np.repeat(x[:, (k - 1) * 6 : (k - 1) * 6 + 2] / spec_scale, CHUNK, axis=0).reshape(len(x), -1)
    offset = here if absolute else np.zeros_like(y)
    net = fit_mlp(x[tr], y[tr] + offset[tr], x[va], y[va] + offset[va], seed, steps, width)
    with torch.no_grad():
        pred = net(torch.from_numpy(x[te])).numpy() - offset[te]
    err = (pred - y[te]).reshape(-1, CHUNK, 2) * spec_scale  # metres
    step = np.linalg.norm(y[te].reshape(-1, CHUNK, 2)[:, 0] * spec_scale, axis=1).mean()
    first = np.linalg.norm(err[:, 0], axis=1)
    chunk = np.linalg.norm(err, axis=2).mean(axis=1)
    return {
        "first_err_m": float(first.mean()),
        "first_rel_step": float(first.mean() / step),
        "chunk_err_m": float(chunk.mean()),
        "chunk_last_err_m": float(np.linalg.norm(err[:, -1], axis=1).mean()),
        "mean_step_m": float(step),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="push_t")
    ap.add_argument("--variant", default="default")
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--seed0", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--windows", type=int, nargs="+", default=[1, 2, 8, 32])
    ap.add_argument("--no-regression", action="store_true")
    ap.add_argument("--no-prev-actions", action="store_true", help="only windows of observations + actions")
    ap.add_argument("--mlp-steps", type=int, default=4000)
    ap.add_argument("--mlp-width", type=int, default=256)
    ap.add_argument("--absolute", action="store_true", help="regress absolute targets, like the policies")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    get_task(args.task)
    audit = args.task == "push_t"
    ro = rollout(args.task, args.variant, args.episodes, args.seed0, args.max_steps, audit)
    lengths = np.array([len(s) for s in ro.states])
    result: dict[str, Any] = {
        "task": args.task,
        "variant": args.variant,
        "absolute_targets": args.absolute,
        "episodes": args.episodes,
        "success": float(np.mean(ro.successes)),
        "length_mean": float(lengths.mean()),
        "length_p95": float(np.percentile(lengths, 95)),
        "length_max": int(lengths.max()),
        **ro.audit,
        "regression": {},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "regression"}, indent=1), flush=True)
    if not args.no_regression:
        for k in args.windows:
            for prev in (True,) if args.no_prev_actions else (False, True):
                r = regression(ro, k, prev, 0, args.mlp_steps, args.mlp_width, args.absolute)
                key = f"k={k}{'+act' if prev else ''}"
                result["regression"][key] = r
                print(key, json.dumps({n: round(v, 4) for n, v in r.items()}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
