"""``results.json``, a Markdown summary and PNG plots from benchmark rows."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("scd_policy.bench")

Row = dict[str, Any]
POLICY_ORDER = ("scd", "causal_diffusion", "diffusion_policy")
MODE_ORDER = ("local", "served_unbatched", "served_batched", "served_paced")  # the serve suite's rows


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def label(row: Row) -> str:
    """The row's policy, with its inference backend when that is not torch: ``scd [onnx]``."""
    backend = row.get("backend", "torch")
    return row["policy"] if backend == "torch" else f"{row['policy']} [{backend}]"


def _order(row: Row) -> tuple[int, int, str]:
    policy = POLICY_ORDER.index(row["policy"]) if row["policy"] in POLICY_ORDER else 99
    backend = row.get("backend", "torch")
    return (policy, backend != "torch", backend)


def _ordered(rows: Sequence[Row]) -> list[Row]:
    def key(row: Row) -> tuple[Any, ...]:
        return (row["suite"], row["mode"], row["K"] or 0, row["history"] or 0, row["batch"], _order(row))

    return sorted(rows, key=key)


def markdown(results: dict[str, Any], command: str) -> str:
    """Tables per suite; ratio_vs_scd = the row's p50 / SCD's p50 in the same setting (same run)."""
    env = results["environment"]
    lines = [
        "# scd-bench results",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {env['cpu']} ({env['cpu_count']} CPUs), torch {env['torch']}, device {env['device']}"
        + (f" ({env['gpu']})" if "gpu" in env else "")
        + f", {env['threads']} thread(s); size preset `{env['size']}`, camera: {env['images']}.",
        "Untrained (random) weights: the cost of a forward pass does not depend on the values.",
        "",
        "Parameters: " + ", ".join(f"{k} {v:,}" for k, v in results["params"].items()),
        "",
    ]
    rows = _ordered(results["rows"])
    for suite in dict.fromkeys(r["suite"] for r in rows):
        part = [r for r in rows if r["suite"] == suite]
        lines += [f"## {suite}", ""]
        if suite == "serve":
            lines += [
                "n sessions in lockstep, one action per session per tick; latency: the client's round "
                "trip (local: one runtime's step). speedup: actions/s over served_unbatched at the same n. "
                "served_paced: n independent robots at rate_hz on their own clocks (ticks spread over a "
                "period, replans over the open-loop cycle); actions/s is the rate they achieved.",
                "",
                "| mode | sessions | K | actions/s | speedup vs unbatched | p50 ms | p99 ms "
                "| p99 vs 1 session |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for r in sorted(part, key=lambda r: (r["batch"], MODE_ORDER.index(r["mode"]))):
                lines.append(
                    f"| {r['mode']} | {r['batch']} | {r['K']} | {_fmt(r['actions_per_s'], 1)} | "
                    f"{_fmt(r['speedup_vs_unbatched'])} | {_fmt(r['p50_ms'])} | {_fmt(r['p99_ms'])} | "
                    f"{_fmt(r['p99_vs_single'])} |"
                )
        elif suite == "limit":
            lines += [
                "Replanning step at batch 1. bound: the step's compute kernels alone, each timed at its "
                "own shapes (no Python or dispatch between them); flops bound: its FLOPs at the best "
                "matmul rate (peak GFLOP/s). vs bound = p50 / bound.",
                "",
                "| policy | size | K | p50 ms | p99 ms | bound ms | vs bound | flops bound ms | GFLOP/step "
                "| kernel calls | ratio_vs_scd |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in sorted(part, key=lambda r: (r["size"], r["K"], _order(r))):
                lines.append(
                    f"| {label(r)} | {r['size']} | {r['K']} | {_fmt(r['p50_ms'])} | {_fmt(r['p99_ms'])} | "
                    f"{_fmt(r['bound_ms'])} | {_fmt(r['ratio_vs_bound'])} | {_fmt(r['flops_bound_ms'])} | "
                    f"{_fmt(r['gflop_per_step'], 3)} | {r['kernel_calls']} | {_fmt(r['ratio_vs_scd'])} |"
                )
        elif suite == "train":
            lines += [
                "| policy | batch | ms/step p50 | p90 | samples/s | chunks/sample | ratio_vs_scd "
                "| peak MiB |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for r in part:
                lines.append(
                    f"| {r['policy']} | {r['batch']} | {_fmt(r['p50_ms'])} | {_fmt(r['p90_ms'])} | "
                    f"{_fmt(r['samples_per_s'], 1)} | {r['chunks_per_sample']} | {_fmt(r['ratio_vs_scd'])} | "
                    f"{_fmt(r['peak_mem_mb'], 1)} |"
                )
        else:
            extra = "per denoise step ms" if suite == "context" else "actions/s"
            lines += [
                f"| policy | mode | K | history | batch | p50 ms | p90 ms | mean ms | ratio_vs_scd | {extra} "
                "| replan tick ms | cache MiB | peak MiB |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in part:
                value = r.get("per_denoise_step_ms") if suite == "context" else r["actions_per_s"]
                lines.append(
                    f"| {label(r)} | {r['mode']} | {r['K']} | {r['history']} | {r['batch']} | "
                    f"{_fmt(r['p50_ms'])} | {_fmt(r['p90_ms'])} | {_fmt(r['mean_ms'])} | "
                    f"{_fmt(r['ratio_vs_scd'])} | {_fmt(value, 1 if suite != 'context' else 3)} | "
                    f"{_fmt(r.get('replan_tick_ms'))} | {_fmt(r['state_mb'], 2)} | "
                    f"{_fmt(r['peak_mem_mb'], 1)} |"
                )
        lines.append("")
    return "\n".join(lines)


def plots(rows: Sequence[Row], out: Path) -> list[Path]:
    """PNG plots (skipped, with a log line, when matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    written: list[Path] = []

    def series(
        suite: str, mode: str, policy: str, x: str, fixed: dict[str, Any]
    ) -> tuple[list[Any], list[Any]]:
        part = [
            r
            for r in rows
            if r["suite"] == suite
            and r["mode"] == mode
            and label(r) == policy
            and all(r[k] == v for k, v in fixed.items())
        ]
        part.sort(key=lambda r: r[x])
        return [r[x] for r in part], [r["p50_ms"] for r in part]

    # Plotted series: a policy on one backend each (scd on torch first: the ratios' reference).
    policies = [label(r) for r in sorted({label(r): r for r in rows}.values(), key=_order)]

    def part_all(suite: str) -> list[Row]:
        return [
            r
            for r in rows
            if r["suite"] == suite and r["mode"] == "replan_every_step" and r["ratio_vs_scd"] is not None
        ]

    for suite in ("latency", "throughput"):
        part = [r for r in rows if r["suite"] == suite and r["mode"] == "replan_every_step"]
        if not part:
            continue
        histories = sorted({r["history"] for r in part})
        ks = sorted({r["K"] for r in part})
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for policy in policies:
            xs, ys = series(suite, "replan_every_step", policy, "K", {"history": histories[0]})
            axes[0].plot(xs, ys, marker="o", label=f"{policy} (history {histories[0]})")
            xs, ys = series(suite, "replan_every_step", policy, "K", {"history": histories[-1]})
            axes[0].plot(xs, ys, marker="s", linestyle="--", label=f"{policy} (history {histories[-1]})")
        # Ratios come from one interleaved run per setting: robust to machine load, unlike absolute ms.
        for policy in policies[1:]:
            for k in ks:
                part = sorted(
                    (r for r in part_all(suite) if label(r) == policy and r["K"] == k),
                    key=lambda r: r["history"],
                )
                axes[1].plot(
                    [r["history"] for r in part],
                    [r["ratio_vs_scd"] for r in part],
                    marker="o",
                    linestyle="-" if policy == "causal_diffusion" else ":",
                    label=f"{policy}, K={k}",
                )
        axes[0].set(
            xscale="log", yscale="log", xlabel="K (denoising steps)", ylabel="ms per control step (p50)"
        )
        axes[1].set(xscale="log", xlabel="history (steps in context)", ylabel="p50 / SCD's p50 (same run)")
        axes[1].axhline(1.0, color="grey", linewidth=0.8)
        axes[0].set_title(f"{suite}, batch {part[0]['batch']}, replan every step")
        axes[1].set_title("time per control step relative to SCD")
        for ax in axes:
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        path = out / f"{suite}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    context = [r for r in rows if r["suite"] == "context" and "per_denoise_step_ms" in r]
    if context:
        fig, ax = plt.subplots(figsize=(6, 4))
        for policy in policies:
            part = sorted((r for r in context if label(r) == policy), key=lambda r: r["history"])
            ax.plot(
                [r["history"] for r in part],
                [r["per_denoise_step_ms"] for r in part],
                marker="o",
                label=policy,
            )
        ax.set(xscale="log", xlabel="history (steps in context)", ylabel="ms per denoising step (p50 diff)")
        ax.set_title("Cost of one denoising step vs history")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        path = out / "context.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    serve = [r for r in rows if r["suite"] == "serve"]
    if serve:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for mode in MODE_ORDER:
            part = sorted((r for r in serve if r["mode"] == mode), key=lambda r: r["batch"])
            if not part:
                continue
            sessions = [r["batch"] for r in part]
            if mode != "served_paced":  # the paced robots' rate is set by their clocks, not the server
                axes[0].plot(sessions, [r["actions_per_s"] for r in part], marker="o", label=mode)
            axes[1].plot(sessions, [r["p99_ms"] for r in part], marker="o", label=mode)
        axes[0].set(xscale="log", yscale="log", xlabel="sessions", ylabel="actions/s (all sessions)")
        axes[1].set(xscale="log", yscale="log", xlabel="sessions", ylabel="p99 latency per action (ms)")
        for ax in axes:
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        axes[0].set_title("Serving a lockstep fleet: throughput")
        axes[1].set_title("... and tail latency (paced: independent robots)")
        path = out / "serve.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(results: dict[str, Any], out: str | Path, command: str) -> dict[str, Path]:
    """Write ``results.json`` (the rows; environment and parameter counts alongside in
    ``environment.json``), ``results.md`` and the plots into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "results": out / "results.json",
        "environment": out / "environment.json",
        "markdown": out / "results.md",
    }
    paths["results"].write_text(json.dumps(_ordered(results["rows"]), indent=1) + "\n", encoding="utf-8")
    paths["environment"].write_text(
        json.dumps({**results["environment"], "params": results["params"], "command": command}, indent=2)
        + "\n",
        encoding="utf-8",
    )
    paths["markdown"].write_text(markdown(results, command) + "\n", encoding="utf-8")
    for path in plots(results["rows"], out):
        paths[path.stem + "_plot"] = path
    return paths
