"""Our own MuJoCo tasks (MJCF under envs/assets/), each with a scripted expert."""
