"""Run reports: metric logs, plots, and the report written at the end of a pipeline."""
