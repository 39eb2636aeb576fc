"""Chunk execution (``scd_policy.execution``): the latency-budget schedule, the blended seam and the
delayed temporal ensemble, hand-computed; the runtime and scd-eval use them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_runtime import K, build, episode

from scd_policy.evaluation import action_smoothness
from scd_policy.execution import ChunkQueue, EnsembledChunks
from scd_policy.runtime import PolicyRuntime

CPU = torch.device("cpu")


def planned(tick: int, length: int, streams: int = 1) -> torch.Tensor:
    """The chunk planned at ``tick``: entry i (meant for tick + i) holds 100 * tick + i."""
    return (100.0 * tick + torch.arange(length, dtype=torch.float32)).view(1, length, 1).repeat(streams, 1, 1)


def drive(executor: ChunkQueue | EnsembledChunks, ticks: int, length: int) -> list[float]:
    out = []
    for tick in range(ticks):
        rows = executor.needs_chunk()
        if rows.numel():
            executor.store(rows, planned(tick, length, rows.numel()))
        out.append(float(executor.pop()[0, 0]))
    return out


@pytest.mark.parametrize("delay", [0, 1, 2, 3])
def test_every_action_is_the_one_its_chunk_meant_for_that_tick(delay: int) -> None:
    n, length = 3, 6
    actions = drive(ChunkQueue(1, length, n, 1, CPU, torch.float32, latency_ticks=delay), 20, length)
    for tick, value in enumerate(actions):
        plan, entry = divmod(round(value), 100)
        assert entry == tick - plan  # never an action meant for another tick
        assert tick - plan >= (delay if plan > 0 else 0)  # a chunk is used only d ticks after planning
    # The first chunk runs n + d ticks, every later one n ticks; plans at ticks n, 2n, ...
    plans = sorted({round(v) // 100 for v in actions})
    assert plans == list(range(0, 20, n))[: len(plans)]
    assert actions[: n + delay] == list(map(float, range(n + delay)))
    assert actions[n + delay] == 100.0 * n + delay


def test_blended_seam_cross_fades_from_the_old_chunk() -> None:
    n, length = 3, 6
    queue = ChunkQueue(1, length, n, 1, CPU, torch.float32, seam="blend", blend_ticks=2)
    actions = drive(queue, 7, length)
    # Tick 3: c0 would give 3, c3 gives 300; weights 1/3 and 2/3 of the new chunk, then c3 alone.
    assert actions[:3] == [0.0, 1.0, 2.0]
    assert actions[3] == pytest.approx(2 / 3 * 3 + 1 / 3 * 300)
    assert actions[4] == pytest.approx(1 / 3 * 4 + 2 / 3 * 301)
    assert actions[5] == 302.0
    assert actions[6] == pytest.approx(2 / 3 * 303 + 1 / 3 * 600)  # the next seam, from c3's entry 3
    assert ChunkQueue(1, 4, 3, 1, CPU, torch.float32, seam="blend", blend_ticks=5).blend_ticks == 1


def test_bad_schedules_are_refused() -> None:
    with pytest.raises(ValueError, match="latency_ticks=4 must be in"):
        ChunkQueue(1, 6, 3, 1, CPU, torch.float32, latency_ticks=4)
    with pytest.raises(ValueError, match="seam='fade'"):
        ChunkQueue(1, 6, 3, 1, CPU, torch.float32, seam="fade")
    with pytest.raises(ValueError, match="below half"):
        EnsembledChunks(1, 6, 1, 0.0, CPU, torch.float32, latency_ticks=3)


def test_delayed_ensemble_averages_the_chunks_that_have_arrived() -> None:
    length, delay = 6, 2
    actions = drive(EnsembledChunks(1, length, 1, 0.0, CPU, torch.float32, latency_ticks=delay), 9, length)
    for tick, value in enumerate(actions):
        # In play at `tick`: the first chunk (entries 0 .. L-d-1) and every chunk planned at s >= 1
        # with s + d <= tick, entry tick - s < L.
        preds = [100.0 * 0 + tick] if tick < length - delay else []
        preds += [100.0 * s + tick - s for s in range(1, tick - delay + 1) if tick - s < length]
        assert value == pytest.approx(np.mean(preds)), tick


def test_runtime_latency_budget_and_seam() -> None:
    policy = build("scd")
    obs = {"state": episode(14, seed=3)["state"][:, 0]}

    def run(**options: object) -> np.ndarray:
        runtime = PolicyRuntime(policy, num_inference_steps=K, seed=1, **options)  # type: ignore[arg-type]
        return np.stack([runtime.step({"state": s}) for s in obs["state"]])

    plain = run()
    np.testing.assert_array_equal(run(latency_ticks=0, seam="switch"), plain)
    delayed = run(latency_ticks=2)
    # Both start with the first chunk's n = 3 actions; the delayed runtime then goes on with its
    # entries 3 and 4 while the chunk planned at tick 3 is "computed".
    np.testing.assert_array_equal(delayed[:3], plain[:3])
    assert np.abs(delayed[3:] - plain[3:]).max() > 1e-4
    blended = run(seam="blend")
    np.testing.assert_array_equal(blended[:3], plain[:3])
    assert np.abs(blended[3] - plain[3]).max() > 1e-6  # the first seam is at tick 3
    assert run(replan_every_step=True, latency_ticks=1).shape == plain.shape
    with pytest.raises(ValueError, match="latency_ticks"):
        PolicyRuntime(policy, latency_ticks=5)


def test_inpainting_keeps_the_given_prefix_and_conditions_the_rest() -> None:
    from scd_policy import diffusion
    from scd_policy.config import DiffusionConfig

    config = DiffusionConfig()
    seen: list[torch.Tensor] = []

    def prepare(times: torch.Tensor) -> diffusion.StepFn:
        def step(x: torch.Tensor, k: int) -> torch.Tensor:
            seen.append(x.clone())
            return x - x.mean(dim=1, keepdim=True)  # couples the entries: the free ones feel the prefix

        return step

    noise = torch.randn(2, 6, 1, generator=torch.Generator().manual_seed(0))
    prefix = torch.full((2, 2, 1), 0.7)
    free = diffusion.sample(prepare, (2, 6, 1), config, num_steps=4, noise=noise)
    seen.clear()
    held = diffusion.sample(
        prepare, (2, 6, 1), config, num_steps=4, noise=noise, prefix=prefix, prefix_start=1
    )
    assert torch.equal(held[:, 1:3], prefix)
    assert not torch.allclose(held[:, 3:], free[:, 3:])
    # Every call saw the prefix noised to its time with the run's own start noise (t = 1 at the first).
    assert torch.allclose(seen[0][:, 1:3], noise[:, 1:3])
    assert torch.allclose(seen[2][:, 1:3], 0.5 * prefix + 0.5 * noise[:, 1:3])


def test_runtime_inpainted_seam_continues_the_old_chunk() -> None:
    policy = build("scd")
    obs = episode(12, seed=5)["state"][:, 0]

    def run(**options: object) -> np.ndarray:
        runtime = PolicyRuntime(policy, num_inference_steps=K, seed=1, **options)  # type: ignore[arg-type]
        return np.stack([runtime.step({"state": s}) for s in obs])

    inpainted = run(seam="inpaint", latency_ticks=2)
    switched = run(latency_ticks=2)
    # The first chunk runs n + d = 5 ticks in both; the next chunk, planned at tick 3, starts with the
    # two actions committed meanwhile when it is inpainted (same noise: only the conditioning differs).
    np.testing.assert_array_equal(inpainted[:5], switched[:5])
    assert np.abs(inpainted[5:] - switched[5:]).max() > 1e-5
    np.testing.assert_array_equal(run(seam="inpaint"), run())  # nothing committed: a plain switch


def test_action_smoothness() -> None:
    ramp = np.arange(10, dtype=np.float64)[:, None] * np.array([[3.0, 4.0]])  # constant velocity
    assert action_smoothness(ramp) == (0.0, 5.0)
    jumpy = ramp.copy()
    jumpy[5] += 10.0
    jerk, jump = action_smoothness(jumpy)
    assert jerk > 0 and jump == pytest.approx(np.linalg.norm([13.0, 14.0]))
    assert np.isnan(action_smoothness(ramp[:3])[0])
