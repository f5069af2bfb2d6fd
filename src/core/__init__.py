"""The seams every layer uses: module converters and deferred weight gradients (no torch.distributed)."""
