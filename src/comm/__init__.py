"""Collectives on process groups handed in; knows nothing of models (token dispatchers live here)."""
