"""CTR models: one file per model, a registry, and the ModelOutput contract."""
