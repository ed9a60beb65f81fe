"""The server stage: coordinator, strategies, simulator, datasets, config and reports."""
