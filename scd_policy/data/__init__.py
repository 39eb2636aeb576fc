"""Data layer: the zarr replay buffer, windowed datasets and the normaliser."""
