"""How often Meta-World's shipped scripted policy solves each v3 task in our wrapper (the evidence behind
``envs.metaworld_tasks.MEASURED_EXPERT_SUCCESS``: only tasks at >= 90% are registered).

    .venv/bin/python scripts/analysis/metaworld_experts.py [--episodes 50] [--envs hammer-v3 ...]

Seeds 0..episodes-1, the registered 500-step limit, episodes ending on success; writes
scripts/analysis/results/metaworld_experts.json and prints a line per task with its category
(the easy / medium / hard / very hard split of Seo et al. 2022, which DP3 and MP1 report by).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from envs.metaworld_tasks import CATEGORIES, MAX_EPISODE_STEPS, MetaWorldEnv, MetaWorldExpert

OUT = Path(__file__).resolve().parent / "results" / "metaworld_experts.json"


def expert_success(env_name: str, episodes: int) -> tuple[float, float]:
    """(success rate, mean steps of the successful episodes) over seeds 0..episodes-1."""
    env = MetaWorldEnv(env_name)
    expert = MetaWorldExpert(env_name)
    wins, lengths = 0, []
    for seed in range(episodes):
        obs, info = env.reset(seed=seed)
        for step in range(1, MAX_EPISODE_STEPS + 1):
            obs, _, terminated, _, info = env.step(expert(obs, info))
            if terminated:
                wins += 1
                lengths.append(step)
                break
    env.close()
    return wins / episodes, (sum(lengths) / len(lengths) if lengths else float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument(
        "--envs", nargs="*", default=[name for names in CATEGORIES.values() for name in names]
    )
    args = parser.parse_args()
    category_of = {name: category for category, names in CATEGORIES.items() for name in names}
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    for env_name in args.envs:
        started = time.perf_counter()
        rate, length = expert_success(env_name, args.episodes)
        results[env_name] = {
            "category": category_of.get(env_name),
            "episodes": args.episodes,
            "success_rate": rate,
            "mean_success_steps": length,
        }
        print(
            f"{env_name:>28} {category_of.get(env_name, '?'):>9}: {100 * rate:5.1f}% "
            f"(mean {length:.0f} steps, {time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        OUT.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
