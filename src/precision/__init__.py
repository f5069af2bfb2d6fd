"""Mixed precision (FP8 with fine-grained scaling arrives with its issue)."""
