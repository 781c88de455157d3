"""Run reports (report.md + plots) and cross-run comparison tables."""
