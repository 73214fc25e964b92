"""Datasets, their schemas and splits: the lowest layer of the data flow."""
