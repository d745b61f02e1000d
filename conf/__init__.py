"""The Hydra configs, shipped inside the package as ``dibs.configs`` (Hydra finds them as ``pkg://dibs.configs``)."""
