"""Dashboard pages. Each is a thin script: read widgets, call analysis, draw the figure."""
