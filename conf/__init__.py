"""Hydra configs of moetron, importable as `moetron.conf` (groups are the sub-folders)."""
