"""EmbeddingConfig: which embedding stack a model gets, and the settings of each variant.

The variant is chosen by `embedding.variant` in an experiment config and travels in the
artifact's config.json, so the server rebuilds exactly the trained stack:

  per_feature  one TorchRec table per sparse feature (the default)
  hashed       one table per feature, ids hashed into a share of `param_budget` rows
  unified      features multiplexed into S shared sub-tables with salted probes (METHODS §6)
  mixed_dim    per-(field, frequency block) tables of different widths (DNIS's export, §7)
  lowrank      per-field tables of width k plus a projection back to `dim` (compression, §8)

Every variant yields the same (B, F, dim) field embedding, so any model takes any variant.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class UnifiedSpec(_Strict):
    """Feature multiplexing settings (`variant: unified`).

    Args:
        num_tables: S, the sub-tables the shared space is split into (probes go round-robin).
        chunk_dim: c, the width of one probe; every multiplexed feature does dim / c probes.
        features: the features that may be multiplexed; None means every sparse feature.
            A feature is multiplexed when it is chosen here and has more than
            `collisionless_max_rows` ids; every other feature keeps an exact D-wide table
            of its own, whose parameters count against `param_budget` too.
        collisionless_max_rows: features with at most this many ids keep an exact table of
            their own (e.g. gender); 0 multiplexes every chosen feature.
        salt: a global salt, so two unified stacks in one model hash differently.
    """

    num_tables: int = Field(default=2, ge=1)
    chunk_dim: int = Field(default=8, ge=1)
    features: tuple[str, ...] | None = None
    collisionless_max_rows: int = Field(default=0, ge=0)
    salt: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _features_not_empty(self) -> UnifiedSpec:
        if self.features is not None and not self.features:
            raise ValueError(
                "embedding.unified.features is empty (expected at least one feature name); "
                "leave it unset to multiplex every sparse feature"
            )
        return self


class BlockSpec(_Strict):
    """One frequency block of a field in a mixed-dimension embedding.

    Args:
        end: exclusive upper id of the block (ids are frequency-ordered, id 0 is OOV); the
            blocks of a field are contiguous and the last one ends at the field's row count.
        kept: the dimensions of the `dim`-wide layout this block keeps, ascending (may be
            empty: the block then embeds to zeros).
    """

    end: int = Field(ge=1)
    kept: tuple[Annotated[int, Field(ge=0)], ...]


class MixedDimSpec(_Strict):
    """Per-field frequency blocks with their kept dimensions (`variant: mixed_dim`).

    Args:
        fields: field name -> its blocks in id order (block i covers ids [end_{i-1}, end_i),
            the first starts at id 0); fields not listed keep full width. Whether the last
            block ends at the field's row count is checked when the embedding is built, where
            the schema is known.
    """

    fields: dict[str, tuple[BlockSpec, ...]]

    @model_validator(mode="after")
    def _blocks_are_contiguous(self) -> MixedDimSpec:
        for field, blocks in self.fields.items():
            ends = [block.end for block in blocks]
            if not ends or any(b <= a for a, b in pairwise(ends)):
                raise ValueError(
                    f"embedding.mixed_dim.fields.{field}: block ends {ends} must be a non-empty, "
                    f"strictly increasing list (each block covers ids [previous end, end)); "
                    f"use the spec `recsys search-dims` wrote"
                )
        return self


class LowRankSpec(_Strict):
    """Factorised tables (`variant: lowrank`): field f stores k_f-wide codes and the model sees
    `codes @ U_f^T + mu_f` (width dim).

    Args:
        ranks: field name -> k_f (1 <= k_f <= dim); fields not listed keep full-width tables.
    """

    ranks: dict[str, Annotated[int, Field(ge=1)]]


class EmbeddingConfig(_Strict):
    """How sparse and dense fields are embedded.

    Args:
        variant: the embedding stack (see the module docstring).
        dim: embedding width D of every field as the model sees it.
        init_scale: tables start as U(-init_scale, init_scale); the bounds travel in the
            table configs, so sharded tables initialise the same way.
        param_budget: `hashed` and `unified`: the total number of table parameters of the
            stack (rows x width summed over every table, the exact tables of collisionless
            features included; dense-feature vectors are not tables and do not count).
        unified: settings of the `unified` variant.
        mixed_dim: the block layout of the `mixed_dim` variant (written by `recsys search-dims`).
        lowrank: the ranks of the `lowrank` variant (written by `recsys compress`).
    """

    variant: Literal["per_feature", "hashed", "unified", "mixed_dim", "lowrank"] = "per_feature"
    dim: int = Field(default=16, ge=1)
    init_scale: float = Field(default=0.05, gt=0)
    param_budget: int | None = Field(default=None, ge=1)
    unified: UnifiedSpec = UnifiedSpec()
    mixed_dim: MixedDimSpec | None = None
    lowrank: LowRankSpec | None = None

    @model_validator(mode="after")
    def _variant_has_its_settings(self) -> EmbeddingConfig:
        if self.variant in ("hashed", "unified") and self.param_budget is None:
            raise ValueError(
                f"embedding.param_budget is required for variant '{self.variant}' (the total "
                f"table parameters, rows x width); e.g. --set embedding.param_budget=20000"
            )
        if self.variant == "unified" and self.dim % self.unified.chunk_dim:
            raise ValueError(
                f"embedding.unified.chunk_dim={self.unified.chunk_dim} must divide "
                f"embedding.dim={self.dim} (each multiplexed feature does dim / chunk_dim probes)"
            )
        if self.variant == "mixed_dim" and self.mixed_dim is None:
            raise ValueError(
                "embedding.mixed_dim is required for variant 'mixed_dim' (the block layout "
                "`recsys search-dims` writes)"
            )
        if self.variant == "lowrank" and self.lowrank is None:
            raise ValueError(
                "embedding.lowrank is required for variant 'lowrank' (the per-field ranks "
                "`recsys compress` writes)"
            )
        if self.mixed_dim is not None:
            for field, blocks in self.mixed_dim.fields.items():
                for block in blocks:
                    if any(d >= self.dim for d in block.kept) or list(block.kept) != sorted(
                        set(block.kept)
                    ):
                        raise ValueError(
                            f"embedding.mixed_dim.fields.{field}: kept dims {list(block.kept)} "
                            f"must be distinct, ascending and below dim={self.dim}"
                        )
        if self.lowrank is not None:
            for field, rank in self.lowrank.ranks.items():
                if rank > self.dim:
                    raise ValueError(
                        f"embedding.lowrank.ranks.{field}={rank} exceeds dim={self.dim}"
                    )
        return self
