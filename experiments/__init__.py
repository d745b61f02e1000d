"""The grids and their presets, shipped inside the package as ``dibs.experiments`` (on Hydra's search path)."""
