"""Typed options of ``scd-bench`` (the Hydra schema behind ``configs/bench.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scd_policy.backends import BACKENDS
from scd_policy.config import POLICY_TYPES, ConfigError

SUITES = ("latency", "throughput", "context", "train", "serve", "limit", "all")
# What suite=all runs: the policy suites (serve starts server processes and runs on its own).
ALL_SUITES = ("latency", "throughput", "context", "train")


@dataclass
class BenchConfig:
    """What to measure and how long. ``quick`` swaps in small grids and few rounds (< 1 min on a CPU)."""

    suite: str = "latency"  # latency | throughput | context | train | serve | limit | all (not serve/limit)
    out: str = "bench"  # folder for results.json, results.md and the plots
    quick: bool = False
    size: str = "small"  # size preset under configs/size/ (on the command line: the `size` config group)
    # Policy fields applied on top of the preset (the CLI's `size` group fills them; policy.d_model=...).
    policy: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    images: bool = False  # add one 96x96 RGB camera to the state (10,) input
    threads: int = 1  # torch CPU threads; 1 for batch-1 latency (no thread hand-offs on a shared CPU)
    policies: list[str] = field(default_factory=lambda: list(POLICY_TYPES))
    # Inference backends of the latency/throughput/context grids (scd_policy.backends): every policy on
    # torch, and scd also on each other one listed (rows carry "backend"; ratio_vs_scd is against scd on
    # torch).
    backends: list[str] = field(default_factory=lambda: ["torch"])
    ks: list[int] = field(default_factory=lambda: [1, 4, 10, 100])  # denoising steps K
    histories: list[int] = field(default_factory=lambda: [8, 32, 128, 512])  # steps already in context
    context_histories: list[int] = field(default_factory=lambda: [8, 32, 128, 512, 1024])
    context_k: int = 10
    rounds: int = 30  # measured rounds per setting (each round: one step of every policy)
    warmup: int = 5  # rounds run first and excluded
    throughput_batch: int = 64
    throughput_rounds: int = 6
    open_loop_steps: int = 8  # n_action_steps of the open-loop mode
    # Also the open loop with PolicyRuntime(defer_encoding=True) for the causal policies (mode
    # "open_loop_deferred": ticks without a replan only tokenize; the replan encodes them in one call).
    deferred_open_loop: bool = False
    train_batch: int = 32
    train_rounds: int = 8
    # serve: concurrent sessions of a lockstep fleet, ticks per round, rounds (scd only)
    serve_sessions: list[int] = field(default_factory=lambda: [1, 8, 32, 64])
    serve_ticks: int = 16
    serve_rounds: int = 5
    # Every session's latency budget (PolicyRuntime latency_ticks): > 0 lets the server plan the next
    # chunk after sending the tick's replies.
    serve_latency_ticks: int = 0
    # Also n independent robots ticking at this rate (Hz) on their own clocks, their ticks and replans
    # spread out as a real fleet's are (mode "served_paced"); 0: only the lockstep fleets.
    serve_rate_hz: float = 10.0
    # The paced robots' server's batch_window_ms: 0 batches what is queued and never waits for a
    # neighbour (scd-serve's default, 5, suits lockstep fleets).
    serve_paced_window_ms: float = 0.0
    # Every session (served and local) with PolicyRuntime(defer_encoding=True): ticks without a
    # replan only buffer their step, the replan encodes the buffered steps (scd-serve defer_encoding).
    serve_defer_encoding: bool = False
    # limit: the presets measured (default: size), at every K of ks and the first of histories.
    limit_sizes: list[str] = field(default_factory=list)
    state_dim: int = 10
    action_dim: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ConfigError(f"suite={self.suite!r}; expected one of {SUITES}")
        unknown = sorted(set(self.policies) - set(POLICY_TYPES))
        if unknown or not self.policies:
            raise ConfigError(f"policies={self.policies}: expected a non-empty subset of {POLICY_TYPES}")
        if "torch" not in self.backends or sorted(set(self.backends) - set(BACKENDS)):
            raise ConfigError(f"backends={self.backends}: expected torch plus any of {list(BACKENDS)}")
        for name in ("ks", "histories", "context_histories", "serve_sessions"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise ConfigError(f"{name}={values}: expected a non-empty list of integers >= 1")
        for name in (
            "rounds",
            "throughput_batch",
            "throughput_rounds",
            "open_loop_steps",
            "train_batch",
            "serve_ticks",
            "serve_rounds",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.serve_rate_hz < 0 or self.serve_paced_window_ms < 0:
            raise ConfigError(
                f"serve_rate_hz and serve_paced_window_ms must be >= 0 (rate 0: no paced robots), got "
                f"{self.serve_rate_hz}, {self.serve_paced_window_ms}"
            )
        if self.warmup < 0 or self.threads < 1:
            raise ConfigError(f"warmup must be >= 0 and threads >= 1; got {self.warmup}, {self.threads}")

    def effective(self) -> BenchConfig:
        """The grids actually run: the configured ones, or the quick ones when ``quick`` is set."""
        if not self.quick:
            return self
        return BenchConfig(
            **{
                **self.__dict__,
                "ks": [k for k in self.ks if k <= 10][:2] or [1],
                # Priming a long history step by step dominates a quick run: cap it at 128 steps.
                "histories": sorted({min(self.histories), min(max(self.histories), 128)}),
                "context_histories": sorted(
                    {min(self.context_histories), min(max(self.context_histories), 128)}
                ),
                "context_k": min(self.context_k, 4),
                "rounds": min(self.rounds, 5),
                "warmup": min(self.warmup, 2),
                "throughput_batch": min(self.throughput_batch, 8),
                "throughput_rounds": min(self.throughput_rounds, 2),
                "train_batch": min(self.train_batch, 4),
                "train_rounds": min(self.train_rounds, 2),
                "serve_sessions": sorted({min(self.serve_sessions), min(max(self.serve_sessions), 4)}),
                "serve_ticks": min(self.serve_ticks, 8),
                "serve_rounds": min(self.serve_rounds, 2),
                "quick": False,
            }
        )
