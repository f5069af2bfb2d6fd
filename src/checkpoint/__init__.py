"""Checkpoints: atomic step folders (folders), torch.distributed.checkpoint with row-shard planners and
safe metadata (dcp_io), and a run's training state saved and resumed in any layout (run_state)."""
