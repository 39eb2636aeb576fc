"""Interoperability with other robot-learning stacks (LeRobot); optional dependencies load lazily."""
