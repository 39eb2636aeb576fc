"""Per-replan and open-loop latency of SCD against LeRobot's own Diffusion Policy and ACT, one process.

    .venv-lerobot/bin/python -m scd_policy.interop.lerobot_latency --out lerobot_latency.json

Every policy is built untrained at (about) the parameter count of SCD's ``--size`` preset: LeRobot's
Diffusion Policy (its 1-D conv UNet, DDIM) with the ``down_dims`` of a small grid closest to it, ACT
(no VAE: inference does not run it) with the ``dim_feedforward`` closest to it; the chosen configs and
counts are printed and recorded. State-only inputs (``--state-dim``; for LeRobot split into a 2-D
agent state and the environment state, as PushT's), ``--action-dim``, horizon / chunk 16, 8 actions
executed per chunk, ``--k`` denoising steps for both diffusion policies (SCD also at ``--scd-ks``, the
cost of a distilled few-step decoder, and on each of ``--backends``).

Two modes, measured interleaved (one call of each policy per round, the starting one rotating):

- ``replan``: one call that plans a chunk (LeRobot: ``reset()`` then ``select_action``, which fills
  its observation queue and runs the model; SCD: a ``PolicyRuntime`` step that replans, its KV cache
  primed with ``--history`` steps);
- ``open_loop``: the mean ms per tick over one cycle of 8 ticks (one replan, seven queued actions);
  SCD also with ``defer_encoding`` (its encoder calls of the cycle done at the replan).

Needs LeRobot (``.venv-lerobot``); docs/RESULTS.md quotes the ratios.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scd_policy.backends import attach_backend
from scd_policy.bench.measure import interleaved, summary
from scd_policy.bench.setup import build_policy, parameter_count
from scd_policy.runtime import PolicyRuntime

HORIZON, N_ACTION_STEPS = 16, 8
# LeRobot Diffusion Policy UNet widths tried for the parameter match (3 stages: horizon 16 / 2^3).
DOWN_DIMS = [(64, 128, 256), (80, 160, 320), (88, 176, 352), (96, 192, 384), (128, 256, 512)]
ACT_FEEDFORWARD = [512, 1024, 1536, 2048, 2560, 3200]


def _features(state_dim: int, action_dim: int) -> tuple[dict[str, Any], dict[str, Any]]:
    from lerobot.configs.types import FeatureType, PolicyFeature

    # LeRobot's Diffusion Policy wants an image or an environment state: the state vector is split the
    # way PushT's is (agent position; the rest as the environment state), for both LeRobot policies.
    inputs = {
        "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(2,)),
        "observation.environment_state": PolicyFeature(type=FeatureType.ENV, shape=(state_dim - 2,)),
    }
    outputs = {"action": PolicyFeature(type=FeatureType.ACTION, shape=(action_dim,))}
    return inputs, outputs


def _closest(
    build: Callable[[dict[str, Any]], torch.nn.Module], candidates: list[dict[str, Any]], target: int
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The policy ``build(settings)`` of the candidate settings whose parameter count is closest to
    ``target``, with those settings."""
    best: tuple[int, torch.nn.Module, dict[str, Any]] | None = None
    for settings in candidates:
        policy = build(settings).eval()
        gap = abs(parameter_count(policy) - target)
        if best is None or gap < best[0]:
            best = (gap, policy, settings)
    assert best is not None
    return best[1], best[2]


def lerobot_diffusion(
    state_dim: int, action_dim: int, k: int, target: int
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """LeRobot's DiffusionPolicy (DDIM, K steps) with the down_dims whose size is closest to ``target``."""
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy

    inputs, outputs = _features(state_dim, action_dim)

    def build(settings: dict[str, Any]) -> torch.nn.Module:
        fields = {**settings, "down_dims": tuple(settings["down_dims"])}
        policy: torch.nn.Module = DiffusionPolicy(
            DiffusionConfig(input_features=inputs, output_features=outputs, **fields)
        )
        return policy

    fixed = {"horizon": HORIZON, "n_obs_steps": 2, "n_action_steps": N_ACTION_STEPS}
    sampler = {"noise_scheduler_type": "DDIM", "num_inference_steps": k}
    return _closest(build, [{"down_dims": list(dims), **fixed, **sampler} for dims in DOWN_DIMS], target)


def lerobot_act(
    state_dim: int, action_dim: int, d_model: int, target: int
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """LeRobot's ACTPolicy (no VAE) of width ``d_model`` with the feed-forward width closest to ``target``."""
    from lerobot.policies.act.configuration_act import ACTConfig
    from lerobot.policies.act.modeling_act import ACTPolicy

    inputs, outputs = _features(state_dim, action_dim)

    def build(settings: dict[str, Any]) -> torch.nn.Module:
        policy: torch.nn.Module = ACTPolicy(
            ACTConfig(input_features=inputs, output_features=outputs, **settings)
        )
        return policy

    fixed = {"chunk_size": HORIZON, "n_action_steps": N_ACTION_STEPS, "use_vae": False}
    return _closest(
        build, [{"dim_model": d_model, "dim_feedforward": ff, **fixed} for ff in ACT_FEEDFORWARD], target
    )


def _lerobot_replan(policy: Any, obs: dict[str, torch.Tensor]) -> Callable[[], float | None]:
    def call() -> None:
        policy.reset()
        with torch.inference_mode():
            policy.select_action(dict(obs))

    return call


def _lerobot_cycle(policy: Any, obs: dict[str, torch.Tensor]) -> Callable[[], float | None]:
    def cycle() -> float:
        policy.reset()
        ticks = []
        with torch.inference_mode():
            for _ in range(N_ACTION_STEPS):
                start = time.perf_counter()
                policy.select_action(dict(obs))
                ticks.append(time.perf_counter() - start)
        return 1000.0 * float(np.mean(ticks))

    return cycle


def _scd_replan(runtime: PolicyRuntime, obs: dict[str, np.ndarray]) -> Callable[[], float | None]:
    def call() -> None:
        runtime.step(obs)

    return call


def _scd_cycle(runtime: PolicyRuntime, obs: dict[str, np.ndarray]) -> Callable[[], float | None]:
    def cycle() -> float:
        start = len(runtime.latencies_ms)
        for _ in range(N_ACTION_STEPS):
            runtime.step(obs)
        return float(np.mean(list(runtime.latencies_ms)[start:]))

    return cycle


def run(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="base", help="SCD size preset (configs/size/)")
    parser.add_argument("--k", type=int, default=10, help="denoising steps of both diffusion policies")
    parser.add_argument(
        "--scd-ks", default="2", help="more K for SCD (comma-separated; a distilled shortcut decoder's K)"
    )
    parser.add_argument("--backends", default="torch,onnx", help="SCD's backends (scd_policy.backends)")
    parser.add_argument("--history", type=int, default=8, help="steps in SCD's KV cache")
    parser.add_argument("--state-dim", type=int, default=10)
    parser.add_argument("--action-dim", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the rows here (JSON)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    scd = build_policy(
        "scd", args.size, args.state_dim, args.action_dim, False, "cpu", 0, {"horizon": HORIZON}
    )
    target = parameter_count(scd)
    diffusion, diffusion_settings = lerobot_diffusion(args.state_dim, args.action_dim, args.k, target)
    act, act_settings = lerobot_act(args.state_dim, args.action_dim, scd.config.d_model, target)
    params = {
        "scd": target,
        "lerobot_diffusion": parameter_count(diffusion),
        "lerobot_act": parameter_count(act),
    }
    print(f"parameters: {params}\nLeRobot diffusion: {diffusion_settings}\nLeRobot ACT: {act_settings}")

    rng = np.random.default_rng(0)
    state = rng.normal(size=args.state_dim).astype(np.float32)
    lerobot_obs = {
        "observation.state": torch.from_numpy(state[:2])[None],
        "observation.environment_state": torch.from_numpy(state[2:])[None],
    }
    scd_obs = {"state": state}

    backends = args.backends.split(",")
    engines = {
        backend: build_policy(
            "scd", args.size, args.state_dim, args.action_dim, False, "cpu", 0, {"horizon": HORIZON}
        )
        for backend in backends
    }
    for backend, engine in engines.items():
        attach_backend(engine, backend)

    def scd_runtime(backend: str, k: int, n_action_steps: int, defer: bool = False) -> PolicyRuntime:
        runtime = PolicyRuntime(
            engines[backend],
            n_action_steps=n_action_steps,
            num_inference_steps=k,
            context_window=args.history + 1,
            defer_encoding=defer,
        )
        for _ in range(args.history):
            runtime.step(scd_obs)
        return runtime

    # (policy, backend, K, mode) -> one measurement
    actions: dict[tuple[str, str, int | None, str], Callable[[], float | None]] = {}
    for backend in backends:
        for k in [args.k, *(int(k) for k in args.scd_ks.split(",") if k)]:
            actions[("scd", backend, k, "replan")] = _scd_replan(scd_runtime(backend, k, 1), scd_obs)
            actions[("scd", backend, k, "open_loop")] = _scd_cycle(
                scd_runtime(backend, k, N_ACTION_STEPS), scd_obs
            )
            actions[("scd", backend, k, "open_loop_deferred")] = _scd_cycle(
                scd_runtime(backend, k, N_ACTION_STEPS, defer=True), scd_obs
            )
    actions[("lerobot_diffusion", "torch", args.k, "replan")] = _lerobot_replan(diffusion, lerobot_obs)
    actions[("lerobot_diffusion", "torch", args.k, "open_loop")] = _lerobot_cycle(diffusion, lerobot_obs)
    actions[("lerobot_act", "torch", None, "replan")] = _lerobot_replan(act, lerobot_obs)
    actions[("lerobot_act", "torch", None, "open_loop")] = _lerobot_cycle(act, lerobot_obs)
    values = interleaved(actions, args.rounds, args.warmup)
    rows: list[dict[str, Any]] = []
    for (policy, backend, k, mode), measured in values.items():
        rows.append(
            {
                "policy": policy,
                "backend": backend,
                "K": k,
                "mode": mode,
                "size": args.size,
                "params": params[policy],
                "threads": args.threads,
                **summary(measured),
            }
        )
    # Every ratio against SCD on torch at the LeRobot policies' K, in the same mode (open loop: plain).
    reference = {
        r["mode"]: r["p50_ms"]
        for r in rows
        if (r["policy"], r["backend"], r["K"]) == ("scd", "torch", args.k)
    }
    for row in rows:
        row["ratio_vs_scd"] = row["p50_ms"] / reference[row["mode"].replace("_deferred", "")]
        label = row["policy"] if row["backend"] == "torch" else f"{row['policy']} [{row['backend']}]"
        print(
            f"{label:<18} K={row['K']!s:<4} {row['mode']:<19} p50 {row['p50_ms']:8.2f} ms  "
            f"p99 {row['p99_ms']:8.2f} ms  x{row['ratio_vs_scd']:.2f} vs scd"
        )
    if args.out is not None:
        record = {"params": params, "lerobot_diffusion": diffusion_settings, "lerobot_act": act_settings}
        args.out.write_text(json.dumps({"settings": record, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    run()
