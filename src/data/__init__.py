"""Training data: tokenizers, token files (moetron's and Megatron-LM's), packed windows, blends and
the validation share, the shipped corpus, and `moetron-data`."""
