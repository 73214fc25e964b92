"""The trainer: Ray Train jobs that build, shard, train, evaluate and export models."""
