"""The multi-rank harness of the tests: `moetron.parallel.local_ranks.run_ranks`."""
from moetron.parallel.local_ranks import run_ranks

__all__ = ["run_ranks"]
