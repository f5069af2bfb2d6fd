"""Parallel state and policies: device meshes, expert/data parallel, recomputation."""
