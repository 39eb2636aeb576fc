"""scd-policy: Separable Causal Diffusion policies for robot learning."""

__version__ = "0.1.0"
