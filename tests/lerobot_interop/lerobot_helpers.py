"""Real data for the LeRobot interop tests: expert demos of one of our tasks, and LeRobotDatasets of them
written with LeRobot's own recording API."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TASK = "reach_around"
IMAGE_SIZE = 64
N_EPISODES = 3
REPO_ID = "local/reach_around"
TASK_TEXT = "push the puck around the obstacle onto the goal"


def collect_demos(n_episodes: int = N_EPISODES) -> list[dict[str, np.ndarray]]:
    """Expert episodes of reach_around: state (T, 6) float32, image (T, 64, 64, 3) uint8 from the top
    camera, image_side the same from the side camera, action (T, 2)."""
    from envs.registry import make_env, make_expert

    env = make_env(TASK, image=True, image_size=IMAGE_SIZE, cameras={"image_side": "side"})
    episodes = []
    try:
        for seed in range(n_episodes):
            expert = make_expert(TASK, seed)
            obs, info = env.reset(seed=seed)
            steps: dict[str, list[np.ndarray]] = {"state": [], "image": [], "image_side": [], "action": []}
            while True:
                action = np.asarray(expert(obs, info), dtype=np.float32)
                for key in ("state", "image", "image_side"):
                    steps[key].append(obs[key])
                steps["action"].append(action)
                obs, _, terminated, truncated, info = env.step(action)
                if terminated or truncated:
                    break
            episodes.append({key: np.stack(values) for key, values in steps.items()})
    finally:
        env.close()
    return episodes


def write_lerobot_dataset(
    root: Path,
    episodes: list[dict[str, np.ndarray]],
    video: bool,
    camera_key: str = "observation.images.top",
    side_camera_key: str | None = None,
) -> Path:
    """The demos as a LeRobotDataset, written with LeRobot's own API (create/add_frame/save_episode);
    ``side_camera_key`` adds the side camera's frames as a second camera."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    cameras = {camera_key: "image", **({side_camera_key: "image_side"} if side_camera_key else {})}
    features = {
        "observation.state": {"dtype": "float32", "shape": (6,), "names": None},
        **{
            key: {
                "dtype": "video" if video else "image",
                "shape": (IMAGE_SIZE, IMAGE_SIZE, 3),
                "names": ["height", "width", "channels"],
            }
            for key in cameras
        },
        "action": {"dtype": "float32", "shape": (2,), "names": None},
    }
    dataset = LeRobotDataset.create(
        REPO_ID, fps=10, features=features, root=root, use_videos=video, vcodec="h264"
    )
    for episode in episodes:
        for step in range(len(episode["action"])):
            dataset.add_frame(
                {
                    "observation.state": episode["state"][step],
                    **{key: episode[ours][step] for key, ours in cameras.items()},
                    "action": episode["action"][step],
                    "task": TASK_TEXT,
                }
            )
        dataset.save_episode()
    dataset.finalize()
    return root
