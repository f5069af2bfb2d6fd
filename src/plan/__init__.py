"""The planner: step time, memory and GPU-hours per cluster (arrives with its issue)."""
