"""Command-line entry points (declared as console scripts in pyproject.toml)."""
