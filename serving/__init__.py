"""The gRPC scoring server (recsys.v1.Scoring). Imports recsys, never training or Ray."""
