"""moetron: the DeepSeek-V3 training system on PyTorch, with pluggable parallelism.

Layers import one way: comm, precision -> parallel -> models -> pipeline -> train; plan reads configs;
`profiling` (trace labels) may be used by any of them.
"""
__version__ = "0.1.0"
