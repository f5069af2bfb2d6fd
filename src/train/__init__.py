"""The training entry point (arrives with the training issue)."""
