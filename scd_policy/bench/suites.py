"""The suites. Each returns rows (one per policy and setting) for ``results.json``.

- ``latency``: per-control-step latency at batch 1 through ``PolicyRuntime.step()``, replanning at every tick
  (every tick pays the K denoiser calls), over K and history length; plus the open-loop mode's mean
  per-step cost (a replan every ``open_loop_steps`` ticks).
- ``throughput``: the same at ``throughput_batch`` parallel streams (actions per second).
- ``context``: K = 1 and K = ``context_k`` over longer histories; the difference gives each policy's cost
  per denoising step as a function of the history length (flat for SCD).
- ``train``: optimizer steps (``compute_loss`` + backward + AdamW) per second on synthetic batches.
- ``serve`` (``serve_suite.py``): n sessions through ``scd-serve`` with and without cross-session
  batching, against n local runtimes.

History length h = the number of steps already in the causal policies' context: the runtime is primed
with h ticks (at K = 1, through ``step()``), and the policy's ``context_window`` is h + 1, so the cache
stays at exactly h past steps (plus the current one) while the measured ticks go on. The windowed
``diffusion_policy`` sees its last ``n_obs_steps`` observations whatever h is.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import platform
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from scd_policy.backends import attach_backend
from scd_policy.bench.config import ALL_SUITES, BenchConfig
from scd_policy.bench.limit import peak_gflops, step_bound
from scd_policy.bench.measure import interleaved, peak_memory_mb, summary, synchronize
from scd_policy.bench.serve_suite import serve_suite
from scd_policy.bench.setup import (
    build_policy,
    context_window_for,
    parameter_count,
    random_observation,
    training_batch,
)
from scd_policy.config import ConfigError
from scd_policy.policies import Policy
from scd_policy.runtime import PolicyRuntime

log = logging.getLogger("scd_policy.bench")

Row = dict[str, Any]


def environment(cfg: BenchConfig) -> dict[str, Any]:
    """Where the numbers come from (stored next to them)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": cfg.threads,
        "device": cfg.device,
        "size": cfg.size,
        "images": cfg.images,
    }
    if cfg.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(cfg.device))
    return info


class Bench:
    """Builds each policy once (same seed, so the same weights for every setting) and runs the suites."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.rng = np.random.default_rng(cfg.seed)
        self.policies: dict[str, Policy] = {name: self._build(name) for name in cfg.policies}
        self.params = {name: parameter_count(p) for name, p in self.policies.items()}
        # What the runtime grids step: (policy, backend) -> the policy on that backend. scd on another
        # backend is a second copy of the same weights (same seed), so the torch rows stay torch's.
        self.runners: dict[tuple[str, str], Policy] = {
            (name, "torch"): p for name, p in self.policies.items()
        }
        if "scd" in self.policies:
            for backend in cfg.backends:
                if backend != "torch":
                    log.info("setting up scd on backend %s", backend)
                    self.runners[("scd", backend)] = attach_backend(self._build("scd"), backend)
        self.common = {"device": cfg.device, "threads": cfg.threads, "size": cfg.size, "images": cfg.images}

    def _build(self, name: str) -> Policy:
        cfg = self.cfg
        return build_policy(
            name, cfg.size, cfg.state_dim, cfg.action_dim, cfg.images, cfg.device, cfg.seed, cfg.policy
        )

    # ------------------------------------------------------------------ runtime grids

    def _observation(self, num_envs: int) -> dict[str, Any]:
        return random_observation(self.rng, num_envs, self.cfg.state_dim, self.cfg.images)

    def _primed(self, runner: tuple[str, str], history: int, num_envs: int, mode: str) -> PolicyRuntime:
        replan_every_step = mode == "replan_every_step"
        runtime = PolicyRuntime(
            self.runners[runner],
            context_window=context_window_for(history),
            num_envs=num_envs,
            num_inference_steps=1,
            replan_every_step=replan_every_step,
            n_action_steps=None if replan_every_step else self.cfg.open_loop_steps,
            seed=self.cfg.seed,
            defer_encoding=mode == "open_loop_deferred",
        )
        for _ in range(history):  # cheap priming (K = 1); the context is what matters
            runtime.step(self._observation(num_envs))
        return runtime

    def _grid(
        self, suite: str, histories: list[int], ks: list[int], num_envs: int, rounds: int, open_loop: bool
    ) -> list[Row]:
        """Interleaved rounds over every (policy, K) of each history; replan-every-step runtimes, plus
        open-loop ones when ``open_loop``."""
        cfg = self.cfg
        rows: list[Row] = []
        modes = ["replan_every_step", "open_loop"] if open_loop else ["replan_every_step"]
        if open_loop and cfg.deferred_open_loop:
            modes.append("open_loop_deferred")
        for history in histories:
            runtimes = {
                (runner, mode): self._primed(runner, history, num_envs, mode)
                for runner in self.runners
                for mode in modes
                if mode != "open_loop_deferred" or self.runners[runner].config.is_causal
            }
            actions: dict[tuple[tuple[str, str], str, int], Callable[[], float | None]] = {}
            slowest: dict[tuple[tuple[str, str], str, int], list[float]] = {}
            for (runner, mode), runtime in runtimes.items():
                for k in ks:
                    slowest[(runner, mode, k)] = []
                    actions[(runner, mode, k)] = self._ticker(
                        runtime, k, num_envs, mode, slowest[(runner, mode, k)]
                    )
            log.info("%s: history %d, %d settings x %d rounds", suite, history, len(actions), rounds)
            values = interleaved(actions, rounds, cfg.warmup)
            for (runner, mode, k), measured in values.items():
                runtime = runtimes[(runner, mode)]
                memory = peak_memory_mb(actions[(runner, mode, k)], self.device)
                stats = summary(measured)
                name, backend = runner
                rows.append(
                    {
                        "suite": suite,
                        "policy": name,
                        "backend": backend,
                        "mode": mode,
                        "K": k,
                        "history": history,
                        "batch": num_envs,
                        **stats,
                        "actions_per_s": 1000.0 * num_envs / stats["p50_ms"],
                        # Open loop: the median over cycles of the cycle's slowest tick (its replan).
                        "replan_tick_ms": float(np.median(slowest[(runner, mode, k)]))
                        if mode != "replan_every_step"
                        else None,
                        "params": self.params[name],
                        "peak_mem_mb": memory,
                        "state_mb": runtime.state_nbytes() / 2**20,
                        **self.common,
                    }
                )
        return rows

    def _ticker(
        self, runtime: PolicyRuntime, k: int, num_envs: int, mode: str, slowest: list[float]
    ) -> Callable[[], float | None]:
        """One measurement: a tick (replan every step), or the mean ms per tick over one open-loop
        cycle of ``open_loop_steps`` ticks (exactly one replan in it; its slowest tick goes to
        ``slowest``)."""
        ticks = 1 if mode == "replan_every_step" else self.cfg.open_loop_steps
        observations = [self._observation(num_envs) for _ in range(ticks)]

        def tick() -> float | None:
            runtime.num_inference_steps = k
            if ticks == 1:
                runtime.step(observations[0])
                return None
            start = len(runtime.latencies_ms)
            for obs in observations:
                runtime.step(obs)
            cycle = list(runtime.latencies_ms)[start:]
            slowest.append(max(cycle))
            return float(np.mean(cycle))

        return tick

    def latency(self) -> list[Row]:
        return self._grid("latency", self.cfg.histories, self.cfg.ks, 1, self.cfg.rounds, open_loop=True)

    def throughput(self) -> list[Row]:
        cfg = self.cfg
        return self._grid(
            "throughput", cfg.histories, cfg.ks, cfg.throughput_batch, cfg.throughput_rounds, open_loop=False
        )

    def context(self) -> list[Row]:
        cfg = self.cfg
        ks = sorted({1, cfg.context_k})
        rows = self._grid("context", cfg.context_histories, ks, 1, cfg.rounds, open_loop=False)
        if len(ks) == 2:
            by_key = {(r["policy"], r["history"], r["K"]): r for r in rows}
            for row in rows:
                if row["K"] == cfg.context_k:
                    one = by_key[(row["policy"], row["history"], 1)]
                    row["per_denoise_step_ms"] = (row["p50_ms"] - one["p50_ms"]) / (cfg.context_k - 1)
        return rows

    def limit(self) -> list[Row]:
        """Per policy, backend and K: the replanning step's latency at batch 1 (interleaved) next to
        its bounds on this machine (``bench.limit``), computed from the torch path's kernels (the same
        arithmetic whatever the backend)."""
        cfg = self.cfg
        history = cfg.histories[0]
        gflops = peak_gflops()
        log.info("limit (%s): best matmul rate %.1f GFLOP/s on %d thread(s)", cfg.size, gflops, cfg.threads)
        runtimes = {runner: self._primed(runner, history, 1, "replan_every_step") for runner in self.runners}
        kernel_times: dict[str, float] = {}
        bounds = {}
        for (name, backend), runtime in runtimes.items():
            if backend == "torch":
                observation = self._observation(1)
                for k in cfg.ks:
                    runtime.num_inference_steps = k
                    step = functools.partial(runtime.step, observation)
                    bounds[(name, k)] = step_bound(step, gflops, kernel_times)
        actions = {
            (runner, k): self._ticker(runtime, k, 1, "replan_every_step", [])
            for runner, runtime in runtimes.items()
            for k in cfg.ks
        }
        log.info("limit (%s): %d settings x %d rounds", cfg.size, len(actions), cfg.rounds)
        rows: list[Row] = []
        for ((name, backend), k), measured in interleaved(actions, cfg.rounds, cfg.warmup).items():
            stats, bound = summary(measured), bounds[(name, k)]
            rows.append(
                {
                    "suite": "limit",
                    "policy": name,
                    "backend": backend,
                    "mode": "replan_every_step",
                    "K": k,
                    "history": history,
                    "batch": 1,
                    **stats,
                    "gflop_per_step": bound.gflop,
                    "kernel_calls": bound.kernel_calls,
                    "bound_ms": bound.kernel_bound_ms,
                    "flops_bound_ms": bound.flops_bound_ms,
                    "peak_gflops": gflops,
                    "ratio_vs_bound": stats["p50_ms"] / bound.kernel_bound_ms,
                    "params": self.params[name],
                    **self.common,
                }
            )
        return rows

    def serve(self) -> list[Row]:
        if "scd" not in self.policies:
            raise ConfigError("suite=serve measures scd: include it in policies")
        cfg = self.cfg
        return serve_suite(
            self.policies["scd"],
            cfg.serve_sessions,
            cfg.serve_ticks,
            cfg.serve_rounds,
            min(cfg.warmup, 1),
            cfg.threads,
            cfg.serve_latency_ticks,
            cfg.serve_rate_hz,
            cfg.serve_paced_window_ms,
            cfg.serve_defer_encoding,
            self._fleet_observation,
            self.common,
        )

    def _fleet_observation(self, num_envs: int) -> dict[str, Any]:
        obs = self._observation(num_envs)
        return obs if num_envs > 1 else {key: value[None] for key, value in obs.items()}

    # ------------------------------------------------------------------ training

    def train(self) -> list[Row]:
        cfg = self.cfg
        steps: dict[str, Callable[[], float | None]] = {}
        for name, policy in self.policies.items():
            steps[name] = self._train_step(policy)
        values = interleaved(steps, cfg.train_rounds, min(cfg.warmup, 2))
        rows = []
        for name, measured in values.items():
            policy = self.policies[name]
            config = policy.config
            memory = peak_memory_mb(steps[name], self.device)
            stats = summary(measured)
            rows.append(
                {
                    "suite": "train",
                    "policy": name,
                    "mode": "train",
                    "K": None,
                    "history": config.train_window if config.is_causal else config.n_obs_steps,
                    "batch": cfg.train_batch,
                    **stats,
                    "samples_per_s": 1000.0 * cfg.train_batch / stats["p50_ms"],
                    # Chunks denoised per sample: every step of a causal window, times the noise draws.
                    "chunks_per_sample": config.decoder_repeats
                    * (config.train_window if config.is_causal else 1),
                    "params": self.params[name],
                    "peak_mem_mb": memory,
                    **self.common,
                }
            )
            policy.eval()
        return rows

    def _train_step(self, policy: Policy) -> Callable[[], float | None]:
        batch = training_batch(policy, self.cfg.train_batch, self.cfg.seed)
        optimizer = torch.optim.AdamW(policy.param_groups(1e-4, 1e-2))

        def step() -> float | None:
            policy.train()
            optimizer.zero_grad(set_to_none=True)
            loss, _ = policy.compute_loss(batch)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            synchronize(self.device)
            return None

        return step


def add_ratios(rows: list[Row]) -> None:
    """``ratio_vs_scd`` = p50 of the row / p50 of the scd row (on torch) of the same setting (>1: slower
    than SCD; for training: time per optimizer step at the same batch size)."""

    def setting(row: Row) -> tuple[Any, ...]:
        # A training "history" is the policy's own window (W steps vs n_obs_steps): not part of the setting.
        keys = (
            ("suite", "mode", "batch", "size")
            if row["suite"] == "train"
            else ("suite", "mode", "K", "history", "batch", "size")
        )
        return tuple(row.get(k) for k in keys)

    scd = {
        setting(r): r["p50_ms"] for r in rows if r["policy"] == "scd" and r.get("backend", "torch") == "torch"
    }
    for row in rows:
        base = scd.get(setting(row))
        row["ratio_vs_scd"] = None if base is None else row["p50_ms"] / base


def run_suites(
    cfg: BenchConfig, after_suite: Callable[[dict[str, Any]], object] | None = None
) -> dict[str, Any]:
    """Run ``cfg.suite`` (or all of them) and return ``{"environment", "params", "rows"}``;
    ``after_suite`` gets the results so far after each suite (a long run writes them as it goes)."""
    cfg = cfg.effective()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        bench = Bench(cfg)
        log.info("parameters: %s", ", ".join(f"{k}={v:,}" for k, v in bench.params.items()))
        suites = list(ALL_SUITES) if cfg.suite == "all" else [cfg.suite]
        rows: list[Row] = []
        results: dict[str, Any] = {"environment": environment(cfg), "params": bench.params, "rows": rows}
        for suite in suites:
            if suite == "limit":  # one bench per preset
                for size in cfg.limit_sizes or [cfg.size]:
                    sized = (
                        bench if size == cfg.size else Bench(dataclasses.replace(cfg, size=size, policy={}))
                    )
                    rows.extend(sized.limit())
            else:
                rows.extend(getattr(bench, suite)())
            add_ratios(rows)
            if after_suite is not None:
                after_suite(results)
        return results
    finally:
        torch.set_num_threads(threads)
