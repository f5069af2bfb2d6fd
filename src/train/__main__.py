"""python -m moetron.train: the same as moetron-train."""
from moetron.train.cli import main

main()
