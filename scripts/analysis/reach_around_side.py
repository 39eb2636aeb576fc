"""reach_around: when does the expert's hidden choice of side show in what a policy sees?

The expert flips a coin for the side (left / right of the obstacle) at the episode start and keeps it.
A policy with a short window must infer the side from the window; while it cannot, its action is a
50/50 mixture, and a policy that re-samples the mode at each replan can switch sides half-way. This
rolls out expert episodes, fits a small classifier from the last ``k`` states (+ previous actions)
to the side on held-out episodes, and reports its accuracy by episode phase, plus how the action
itself is predictable (MLP regression error relative to the action's norm).

    .venv/bin/python scripts/analysis/reach_around_side.py --episodes 200 --windows 1 2 8
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch
from torch import nn

from envs.registry import make_env, make_expert
from envs.tasks.reach_around import ReachAroundExpert

PHASES = ((0, 5), (5, 10), (10, 20), (20, 40), (40, 1000))


def rollouts(episodes: int) -> list[dict[str, Any]]:
    env = make_env("reach_around")
    out = []
    for seed in range(episodes):
        expert = make_expert("reach_around", seed)
        assert isinstance(expert, ReachAroundExpert)
        obs, info = env.reset(seed=seed)
        s, a = [], []
        while True:
            act = np.asarray(expert(obs, info), np.float32)
            s.append(obs["state"])
            a.append(act)
            obs, _, term, trunc, info = env.step(act)
            if term or trunc:
                break
        out.append(
            {
                "state": np.stack(s),
                "action": np.stack(a),
                "side": expert.side,
                "success": bool(info["success"]),
                "passed": int(info["passed_side"]),
            }
        )
    env.close()
    return out


def features(ep: dict[str, Any], k: int) -> np.ndarray:
    s, a = ep["state"], ep["action"]
    s_pad = np.concatenate([np.repeat(s[:1], k - 1, axis=0), s])
    a_prev = np.concatenate([np.zeros((k, a.shape[1]), np.float32), a])  # a_prev[t + k - 1] = a[t - 1]
    return np.stack(
        [np.concatenate([s_pad[t : t + k].reshape(-1), a_prev[t : t + k].reshape(-1)]) for t in range(len(s))]
    )


def fit(x: np.ndarray, y: np.ndarray, loss: str, steps: int = 3000) -> nn.Module:
    torch.manual_seed(0)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    out_dim = 1 if loss == "bce" else y.shape[1]
    net = nn.Sequential(
        nn.Linear(x.shape[1], 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, out_dim)
    )
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy((x - mu) / sd).float(), torch.from_numpy(y).float()
    for _ in range(steps):
        idx = torch.randint(0, len(xt), (256,))
        pred = net(xt[idx])
        if loss == "bce":
            value = nn.functional.binary_cross_entropy_with_logits(pred[:, 0], yt[idx])
        else:
            value = nn.functional.mse_loss(pred, yt[idx])
        opt.zero_grad()
        value.backward()
        opt.step()

    class Wrapped(nn.Module):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return net((z - torch.from_numpy(mu).float()) / torch.from_numpy(sd).float())

    return Wrapped()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--windows", type=int, nargs="+", default=[1, 2, 8])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    eps = rollouts(args.episodes)
    n_test = len(eps) // 5
    test, train = eps[:n_test], eps[n_test:]
    lengths = [len(e["state"]) for e in eps]
    result: dict[str, Any] = {
        "episodes": len(eps),
        "success": float(np.mean([e["success"] for e in eps])),
        "left_share": float(np.mean([e["side"] == -1 for e in eps])),
        "passed_matches_side": float(np.mean([e["passed"] == e["side"] for e in eps])),
        "length_mean": float(np.mean(lengths)),
        "length_max": int(np.max(lengths)),
        "windows": {},
    }
    print(json.dumps(result), flush=True)
    for k in args.windows:
        xs = [features(e, k) for e in train]
        x = np.concatenate(xs)
        side = np.concatenate(
            [np.full(len(f), e["side"] > 0, np.float32) for f, e in zip(xs, train, strict=True)]
        )
        clf = fit(x, side, "bce")
        act = np.concatenate([e["action"] for e in train])
        reg = fit(x, act, "mse")
        by_phase: dict[str, float] = {}
        confident: dict[str, float] = {}
        errs, norms = [], []
        for lo, hi in PHASES:
            correct, sure, count = 0, 0, 0
            for e in test:
                f = features(e, k)[lo:hi]
                if len(f) == 0:
                    continue
                with torch.no_grad():
                    p = torch.sigmoid(clf(torch.from_numpy(f).float())[:, 0]).numpy()
                correct += int(((p > 0.5) == (e["side"] > 0)).sum())
                sure += int((np.abs(p - 0.5) > 0.4).sum())
                count += len(f)
            by_phase[f"{lo}-{hi}"] = correct / max(count, 1)
            confident[f"{lo}-{hi}"] = sure / max(count, 1)
        for e in test:
            with torch.no_grad():
                pred = reg(torch.from_numpy(features(e, k)).float()).numpy()
            errs.append(np.linalg.norm(pred - e["action"], axis=1))
            norms.append(np.linalg.norm(e["action"], axis=1))
        err, norm = np.concatenate(errs), np.concatenate(norms)
        early = (
            np.concatenate([x_[:10] for x_ in errs]).mean() / np.concatenate([n[:10] for n in norms]).mean()
        )
        result["windows"][f"k={k}+act"] = {
            "side_accuracy_by_step": by_phase,
            "side_confident_frac_by_step": confident,
            "action_err_rel": float(err.mean() / norm.mean()),
            "action_err_rel_first10": float(early),
        }
        print(f"k={k}+act", json.dumps(result["windows"][f"k={k}+act"]), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
