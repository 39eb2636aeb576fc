"""MuJoCo tasks with scripted experts, registered with gymnasium."""
