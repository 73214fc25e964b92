"""Embedding stacks built from a FeatureSchema and injected into models."""

from recsys.embeddings.config import EmbeddingConfig
from recsys.embeddings.per_feature import FieldEmbedding, build_embedding

__all__ = ["EmbeddingConfig", "FieldEmbedding", "build_embedding"]
