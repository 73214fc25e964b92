"""DNIS embedding-dimension search: soft selection, alternating train/valid steps, pruning."""

from recsys.search.dnis import (
    DNISConfig,
    SearchData,
    SearchResult,
    SoftSelectionEmbedding,
    build_search_model,
    frequency_blocks,
    run_search,
)

__all__ = [
    "DNISConfig",
    "SearchData",
    "SearchResult",
    "SoftSelectionEmbedding",
    "build_search_model",
    "frequency_blocks",
    "run_search",
]
