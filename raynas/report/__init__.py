"""Reports: Pareto plots and run summaries."""
