"""Pipeline schedules, simulator and runtime (arrive with the pipeline issue)."""
