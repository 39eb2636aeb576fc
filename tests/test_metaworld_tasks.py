"""Meta-World specifics: registration, seeding of scenes, image orientation, action handling."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import mujoco
import numpy as np
import pytest

import envs.metaworld_tasks
from envs.metaworld_tasks import CAMERAS, MEASURED_EXPERT_SUCCESS, MetaWorldEnv, category
from envs.registry import get_task, make_env, make_expert, task_names

KEPT = {
    "mw_push": "push-v3",
    "mw_pick_place": "pick-place-v3",
    "mw_drawer_open": "drawer-open-v3",
    "mw_door_open": "door-open-v3",
    "mw_button_press_topdown": "button-press-topdown-v3",
    "mw_peg_insert_side": "peg-insert-side-v3",
    "mw_hammer": "hammer-v3",
    "mw_bin_picking": "bin-picking-v3",
    "mw_assembly": "assembly-v3",
    "mw_pick_out_of_hole": "pick-out-of-hole-v3",
    "mw_shelf_place": "shelf-place-v3",
    "mw_disassemble": "disassemble-v3",
    "mw_stick_pull": "stick-pull-v3",
}


@pytest.fixture
def push_env() -> Iterator[MetaWorldEnv]:
    env = MetaWorldEnv("push-v3")
    yield env
    env.close()


def test_registered_tasks_and_specs() -> None:
    assert set(task_names("metaworld")) == set(KEPT)
    for name, env_name in KEPT.items():
        spec = get_task(name)
        assert spec.kwargs == {"env_name": env_name}
        assert (spec.state_dim, spec.action_dim, spec.max_episode_steps) == (39, 4, 500)
        assert spec.fps == 80.0  # 5 physics steps of 2.5 ms per control step
        assert spec.cameras[0] == "corner" and set(spec.cameras) == set(CAMERAS)
        assert spec.tags == ("metaworld", f"metaworld_{category(env_name)}")
    # Only tasks whose expert was measured at >= 90% success are registered.
    assert set(MEASURED_EXPERT_SUCCESS) == set(KEPT)
    assert min(MEASURED_EXPERT_SUCCESS.values()) >= 0.9
    # At least two of each harder category of Meta-World's split (issue H.4).
    for level in ("medium", "hard", "very_hard"):
        assert len(task_names(f"metaworld_{level}")) >= 2, level
    assert set(task_names("metaworld_very_hard")) == {"mw_shelf_place", "mw_disassemble", "mw_stick_pull"}


@pytest.mark.parametrize("task", ["mw_hammer", "mw_assembly", "mw_disassemble"])
def test_new_tasks_experts_solve_a_seeded_episode(task: str) -> None:
    # One scene of a medium, a hard and a very hard task, through the registry's entry points.
    env = make_env(task)
    try:
        expert = make_expert(task, 0)
        obs, info = env.reset(seed=0)
        terminated = truncated = False
        while not (terminated or truncated):
            obs, _, terminated, truncated, info = env.step(expert(obs, info))
        assert terminated and info["success"] is True
    finally:
        env.close()
    with pytest.raises(AttributeError, match="make_juggle_expert"):
        _ = envs.metaworld_tasks.make_juggle_expert


def test_importing_the_module_does_not_import_metaworld() -> None:
    code = "import sys, envs.metaworld_tasks; print('metaworld' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_scene_is_drawn_from_the_seed_only(push_env: MetaWorldEnv) -> None:
    # Meta-World's MT1 would draw from the global np.random; ours must ignore it.
    np.random.seed(0)  # noqa: NPY002 (the legacy global generator is the point here)
    first = push_env.reset(seed=5)[0]["state"]
    np.random.seed(123)  # noqa: NPY002
    again = push_env.reset(seed=5)[0]["state"]
    np.testing.assert_array_equal(first, again)
    # puck position (4:7) and goal (36:39) differ between seeds: every seed is its own scene.
    scenes = {tuple(np.round(push_env.reset(seed=s)[0]["state"][[4, 5, 36, 37]], 6)) for s in range(8)}
    assert len(scenes) == 8
    # Unseeded resets continue the seeded stream reproducibly, with new scenes.
    push_env.reset(seed=5)
    follow_up = push_env.reset()[0]["state"]
    assert not np.array_equal(follow_up, first)
    other = MetaWorldEnv("push-v3")
    try:
        other.reset(seed=5)
        np.testing.assert_array_equal(other.reset()[0]["state"], follow_up)
    finally:
        other.close()


def test_goal_is_observed_and_initial_state_is_clipped_into_space(push_env: MetaWorldEnv) -> None:
    obs, info = push_env.reset(seed=0)
    goal = obs["state"][36:39]
    space = push_env.observation_space["state"]
    assert np.all(goal >= space.low[36:39]) and np.all(goal <= space.high[36:39])
    assert np.linalg.norm(goal) > 0.5  # a real table position (y ~ 0.8), not the hidden-goal zeros
    assert info == {"success": False, "steps": 0}


def test_actions_are_clipped_and_checked(push_env: MetaWorldEnv) -> None:
    push_env.reset(seed=1)
    clipped = push_env.step(np.array([5.0, -5.0, 5.0, 5.0]))[0]["state"]
    push_env.reset(seed=1)
    unit = push_env.step(np.array([1.0, -1.0, 1.0, 1.0]))[0]["state"]
    np.testing.assert_array_equal(clipped, unit)
    with pytest.raises(ValueError, match=r"expected \(4,\)"):
        push_env.step(np.zeros(3))


def test_bad_constructor_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="no camera 'side'"):
        MetaWorldEnv("push-v3", image=True, camera="side")
    with pytest.raises(ValueError, match="not a Meta-World v3 environment"):
        MetaWorldEnv("push-v2")
    with pytest.raises(ValueError, match="has no camera"):
        make_env("mw_push", image=True, camera="top")


def test_episode_limit_is_the_time_limits_not_metaworlds() -> None:
    # Meta-World raises after its own 500 steps; a longer limit from make_env must still work.
    env = make_env("mw_button_press_topdown", max_episode_steps=503)
    try:
        env.reset(seed=0)
        zero = np.zeros(4, np.float32)
        for _ in range(502):
            assert env.step(zero)[3] is False
        assert env.step(zero)[3] is True
    finally:
        env.close()


def test_expert_succeeds_and_success_terminates() -> None:
    env = make_env("mw_push")
    try:
        expert = make_expert("mw_push", 0)
        obs, info = env.reset(seed=0)
        terminated = truncated = False
        while not (terminated or truncated):
            obs, _, terminated, truncated, info = env.step(expert(obs, info))
        assert terminated and info["success"] is True
        assert info["steps"] < 500
        # The success criterion itself: the puck (state[4:7]) within 5 cm of the goal (state[36:39]).
        assert np.linalg.norm(obs["state"][4:7] - obs["state"][36:39]) <= 0.05
    finally:
        env.close()


def _project(
    model: mujoco.MjModel, data: mujoco.MjData, camera: str, point: np.ndarray, size: int
) -> tuple[int, int]:
    """Pixel (row, col) of a world point in MuJoCo's own image layout for this camera."""
    cam = model.camera(camera).id
    rotation = data.cam_xmat[cam].reshape(3, 3)
    p = rotation.T @ (point - data.cam_xpos[cam])  # camera frame: x right, y up, looking along -z
    focal = 0.5 * size / np.tan(np.deg2rad(model.cam_fovy[cam]) / 2)
    return round(float(size / 2 - focal * p[1] / -p[2])), round(float(size / 2 + focal * p[0] / -p[2]))


def test_images_are_upright() -> None:
    size = 128
    env = MetaWorldEnv("push-v3", image=True, camera="corner", image_size=size)
    try:
        puck_geom = env.model.geom("objGeom").id
        env.model.geom_rgba[puck_geom] = [0.0, 0.0, 1.0, 1.0]  # pure blue: nothing else in the scene is
        obs, _ = env.reset(seed=0)
        puck = obs["state"][4:7].astype(np.float64)
        row, col = _project(env.model, env.data, "corner", puck, size)
        above_row, _ = _project(env.model, env.data, "corner", puck + np.array([0.0, 0.0, 0.2]), size)
        # Meta-World's corner camera has its "up" axis pointing down in the world, so MuJoCo draws
        # the world upside down: a point above the puck lands lower in MuJoCo's layout ...
        assert above_row > row

        # ... and the observation flips rows, so the puck appears at the mirrored row, in blue.
        def is_blue(r: int) -> bool:
            patch = obs["image"][r - 1 : r + 2, col - 1 : col + 2].reshape(-1, 3).astype(int)
            return bool(np.all(patch[:, 2] >= patch[:, 0] + 20) and np.all(patch[:, 2] >= patch[:, 1] + 20))

        assert is_blue(size - 1 - row)
        assert not is_blue(row)
    finally:
        env.close()


def test_two_live_envs_both_render(push_env: MetaWorldEnv) -> None:
    # The fast render settings once gave black frames in a process's second env.
    first = MetaWorldEnv("pick-place-v3", image=True, image_size=40)
    second = MetaWorldEnv("pick-place-v3", image=True, image_size=40)
    try:
        image_a = first.reset(seed=3)[0]["image"]
        image_b = second.reset(seed=3)[0]["image"]
        assert image_a.std() > 10.0 and 20.0 < image_a.mean() < 235.0
        np.testing.assert_array_equal(image_a, image_b)
        # Interleaved use: rendering in one context must not spoil the other's frames.
        np.testing.assert_array_equal(first.reset(seed=3)[0]["image"], image_b)
    finally:
        first.close()
        second.close()
