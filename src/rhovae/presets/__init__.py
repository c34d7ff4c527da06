"""Experiment presets for `rhovae compare` (TOML files read with importlib.resources)."""
