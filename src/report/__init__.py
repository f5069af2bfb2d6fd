"""Pictures of a run: `moetron-report RUN_DIR` (moetron.report.cli)."""
