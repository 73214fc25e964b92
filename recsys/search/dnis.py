"""DNIS: differentiable search of a mixed embedding dimension per (field, frequency block).

METHODS.md §7. Data flow: a per-feature model whose embedding is wrapped in a soft selection
layer (`SoftSelectionEmbedding`: every looked-up row is scaled by its block's α ∈ [0, 1]^D)
-> warm start (all weights, α fixed) -> alternating mini-batch steps, a train batch for the
embedding-side weights and a valid batch for α (L1 on α, per-block gradient normalisation,
SGD, clip to [0, 1]) -> pruning of the (block, dim) entries to a threshold or a parameter
budget -> a `MixedDimSpec` that `recsys.embeddings.mixed_dim` builds and the trainer retrains.

Pure torch: batches come in as iterables (the Ray job in `training/search.py` streams them
from Parquet). The search is single-process: it needs unfused tables with explicit optimizers,
so that a valid batch can update α alone.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys.embeddings.config import BlockSpec, EmbeddingConfig, MixedDimSpec
from recsys.embeddings.mixed_dim import BlockLayout, in_field_order
from recsys.embeddings.per_feature import FieldEmbedding, build_per_feature_embedding
from recsys.errors import ConfigError
from recsys.features.batch import Batch, Features
from recsys.features.schema import FeatureSchema
from recsys.metrics import binary_metrics
from recsys.models.outputs import CTRModel
from recsys.models.registry import build_model

logger = logging.getLogger(__name__)

GRAD_NORM_EPS = 1e-8


class DNISConfig(BaseModel):
    """Settings of `recsys search-dims` (the `search:` section of an experiment config).

    The searched width D is `embedding.dim`; the retrain uses the `train:` section unchanged.

    Args:
        block_fractions: the share of a field's ids in each frequency block, head first
            (ids are frequency ordered); positive, summing to 1. A field with fewer ids than
            blocks gets one block per id.
        fields: the searched sparse fields; None searches every one. The others keep full
            width and α = 1.
        batch_size: rows per train and per valid (α) mini-batch.
        warm_max_epochs: warm-start epochs at most (all weights, α fixed at 1, Adam lr_w);
            0 skips the warm start.
        warm_patience: warm start stops after this many epochs without a better valid AUC
            (the best epoch's weights are restored).
        search_epochs: epochs of alternating train/valid steps.
        steps_per_epoch: caps the alternating steps of one search epoch (None: the whole train
            split); for smoke runs.
        lr_w: Adam learning rate of every weight in the warm start and of the embedding-side
            weights (tables, dense-feature vectors) in the search.
        lr_alpha: SGD learning rate of α.
        l1: λ, the weight of ‖α‖₁ in the valid loss; without it nothing is pruned. The
            paper's 1e-5 leaves most α near 1 on ml100k; 1e-4 spreads them (measured).
        use_grad_norm: divide each block's α gradient by its mean absolute value (+1e-8), so
            rare blocks' α moves as fast as frequent blocks' (METHODS.md §7(f)).
        prune_score: what ranks the (block, dim) entries for a parameter budget: `alpha`
            itself, or `magnitude`, the mean |α·e| over the block's rows (the authors' pruning
            notebooks). On ml100k α kept the valid AUC of the pruned model higher.
        prune_threshold: ε: keep the dims with α >= ε (then rounded up to width_multiple).
        target_ratio: keep at most this share of the full tables' parameters instead.
        width_multiple: every kept width is a multiple of this; the sharded trainer's fused
            kernels need 4. Must divide embedding.dim.
        sweep_ratios: parameter shares of the pruning sweep (the AUC-vs-parameters curve).
        retrain_from: where the retrain of the pruned model starts (METHODS.md §7(b)6, "fold α
            into the table, retrain/fine-tune"): `searched`, the searched model's weights with
            α folded into the kept columns (`folded_state`), or `scratch`, a fresh init. Either
            way the retrain runs the `train:` section (epochs, early stopping, seed) unchanged
            but for its learning rates (`retrain_lr_scale`).
        retrain_lr_scale: multiplies the `train:` section's dense_lr and table_lr in the
            retrain. None (the default): 0.1 from the searched weights, a fine-tune, and 1
            from scratch. At the full rates the retrain's fresh row-wise Adagrad (table_lr
            0.05) moves every row by about the scale of the searched embeddings on its first
            steps, throwing away much of what the search found: on ml100k-ctr the fine-tune
            scored 0.7790 test AUC against 0.7771 at the full rates (5 seeds; +0.0018 and
            +0.0017 on seeds 3 and 4, run after this choice was made on seeds 0-2).
        alpha_valid_share: the share of the valid rows the search reads (for the α steps,
            the warm start's early stopping and the pruning sweep; a fixed hash of the row
            number picks them). Below 1 the retrain selects its epoch on the other rows
            (`train.valid_exclude_share`): α is fitted on valid, so a retrain that starts from
            the searched weights and early-stops on the same rows sees an optimistic valid AUC
            that falls as training moves away from α's fit. 1 (the default, the paper's
            setup) gives every valid row to both.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    block_fractions: tuple[float, ...] = (0.1, 0.2, 0.2, 0.2, 0.3)
    fields: tuple[str, ...] | None = None
    batch_size: int = Field(1024, ge=1)
    warm_max_epochs: int = Field(10, ge=0)
    warm_patience: int = Field(1, ge=0)
    search_epochs: int = Field(3, ge=1)
    steps_per_epoch: int | None = Field(None, ge=1)
    lr_w: float = Field(1e-3, gt=0)
    lr_alpha: float = Field(1e-2, gt=0)
    l1: float = Field(1e-4, ge=0)
    use_grad_norm: bool = True
    prune_score: Literal["alpha", "magnitude"] = "alpha"
    prune_threshold: float | None = Field(None, ge=0, le=1)
    target_ratio: float | None = Field(0.5, gt=0, le=1)
    width_multiple: int = Field(4, ge=1)
    sweep_ratios: tuple[float, ...] = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
    retrain_from: Literal["searched", "scratch"] = "searched"
    retrain_lr_scale: float | None = Field(None, gt=0, le=1)
    alpha_valid_share: float = Field(1.0, gt=0, le=1)

    @property
    def retrain_lr_factor(self) -> float:
        """The factor the retrain applies to the train section's learning rates."""
        if self.retrain_lr_scale is not None:
            return self.retrain_lr_scale
        return 0.1 if self.retrain_from == "searched" else 1.0

    @model_validator(mode="after")
    def _consistent(self) -> DNISConfig:
        fractions = self.block_fractions
        if not fractions or min(fractions) <= 0 or not math.isclose(sum(fractions), 1.0):
            raise ValueError(
                f"search.block_fractions: {list(fractions)} must be positive shares summing "
                f"to 1 (e.g. [0.1, 0.2, 0.2, 0.2, 0.3])"
            )
        if (self.prune_threshold is None) == (self.target_ratio is None):
            raise ValueError(
                f"search: give exactly one of prune_threshold and target_ratio (got "
                f"prune_threshold={self.prune_threshold}, target_ratio={self.target_ratio}); "
                f"set the other to null"
            )
        if self.width_multiple % 4:
            raise ValueError(
                f"search.width_multiple={self.width_multiple} must be a multiple of 4 (the "
                f"sharded trainer's fused table kernels need widths divisible by 4)"
            )
        if any(not 0 < r <= 1 for r in self.sweep_ratios):
            raise ValueError(
                f"search.sweep_ratios: {list(self.sweep_ratios)} must lie in (0, 1] "
                f"(shares of the full tables' parameters)"
            )
        return self


def frequency_blocks(num_embeddings: int, fractions: Sequence[float]) -> list[int]:
    """Exclusive end ids of a field's contiguous frequency blocks over ids [0, num_embeddings).

    Ids are frequency ordered (0 is OOV, then the most frequent value), so block 0 is the head.
    Block i ends near `cumsum(fractions)[i] * num_embeddings`, every block holds at least one
    id, and a field with fewer ids than fractions gets one block per id.

    Example:
        >>> frequency_blocks(944, [0.1, 0.2, 0.2, 0.2, 0.3])
        [94, 283, 472, 661, 944]
        >>> frequency_blocks(3, [0.1, 0.2, 0.2, 0.2, 0.3])
        [1, 2, 3]
    """
    if num_embeddings < 1:
        raise ConfigError(f"search: a field has {num_embeddings} rows (expected at least 1)")
    num_blocks = len(fractions)
    if num_embeddings <= num_blocks:
        return list(range(1, num_embeddings + 1))
    cumulative = np.cumsum(np.asarray(fractions, dtype=np.float64))
    cumulative /= cumulative[-1]
    ends: list[int] = []
    previous = 0
    for i in range(num_blocks - 1):
        end = round(float(cumulative[i]) * num_embeddings)
        end = min(max(end, previous + 1), num_embeddings - (num_blocks - 1 - i))
        ends.append(end)
        previous = end
    ends.append(num_embeddings)
    return ends


class SoftSelectionEmbedding(FieldEmbedding):
    """Per-feature tables whose looked-up rows are scaled dimension-wise by their block's α.

    Paper: Cheng, Shen, Huang, "Differentiable Neural Input Search for Recommender Systems"
    (DNIS), arXiv:2006.04466: `ê_i = e_i ⊙ α_{b(i)}` with one α ∈ [0, 1]^D per block.

    Field f's ids fall in contiguous frequency blocks; `alpha` is (F_sparse, S, D) with S the
    most blocks of any field (slots past a field's own blocks are unused). Rows are scaled
    before pooling, so a bag whose ids span blocks is the mean of its scaled rows. `dim_mask`
    (same shape, 1 by default) multiplies α: the pruning sweep zeroes pruned entries there.

    Differences from the paper:
        - One α per (field, block, dim) instead of one table-wide α per (block, dim), as every
          field here has its own table and frequency ordering.
        - Unsearched fields keep α = 1 (their `searched` entries are False).

    Shapes: Features with B rows -> (B, F, D), as the per-feature embedding (dense fields
    after sparse ones, unscaled).

    Args:
        tables: the per-feature EmbeddingBagCollection (unfused, one D-wide table per field, in
            field order), e.g. from `build_per_feature_embedding`.
        layout: every field's blocks.
        block_ends: per field, the end ids of its blocks (as given to `layout`).
        searched: per field, whether its α is searched.
        sparse_names: sparse feature names in field order.
        num_dense: number of dense features.
        dim: D.

    Example:
        >>> import pyarrow as pa
        >>> from recsys.data.schema import DatasetSchema
        >>> from recsys.features.batch import features_from_rows
        >>> from recsys.features.schema import fit_feature_schema
        >>> from recsys.models.autoint import AutoIntConfig
        >>> dataset = DatasetSchema.model_validate({"name": "toy", "columns": [
        ...     {"name": "item_id", "role": "categorical"},
        ...     {"name": "click", "role": "label", "task": "ctr"}]})
        >>> rows = pa.table({"item_id": list("aaabbc"), "click": [1, 0, 1, 0, 1, 0]})
        >>> schema = fit_feature_schema(dataset, [rows])  # ids: 0 OOV, 1 a, 2 b, 3 c
        >>> model = build_search_model(
        ...     AutoIntConfig(num_layers=1, num_heads=1, attention_dim=4), schema,
        ...     EmbeddingConfig(dim=4), DNISConfig(block_fractions=(0.5, 0.5)))
        >>> model.embedding.block_ends, tuple(model.embedding.alpha.shape)
        ([[2, 4]], (1, 2, 4))
        >>> model.embedding(features_from_rows(schema, [{"item_id": "c"}])).shape
        torch.Size([1, 1, 4])
    """

    block_slot: torch.Tensor
    block_rows: torch.Tensor
    searched: torch.Tensor
    dim_mask: torch.Tensor

    def __init__(
        self,
        tables: EmbeddingBagCollection,
        layout: BlockLayout,
        block_ends: list[list[int]],
        searched: list[bool],
        sparse_names: list[str],
        num_dense: int,
        dim: int,
    ) -> None:
        super().__init__(tables, sparse_names, num_dense, dim)
        self.layout = layout
        self.block_ends = [list(ends) for ends in block_ends]
        self.searched_fields = list(searched)
        num_fields = len(sparse_names)
        num_slots = max(len(ends) for ends in block_ends)
        self.num_slots = num_slots
        self.table_names = [config.name for config in tables.embedding_bag_configs()]
        self.alpha = nn.Parameter(torch.ones(num_fields, num_slots, dim))
        slot, rows = [], torch.zeros(num_fields, num_slots, dtype=torch.int64)
        searched_slots = torch.zeros(num_fields, num_slots, dtype=torch.bool)
        for f, ends in enumerate(block_ends):
            for s, (start, end) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
                slot.append(f * num_slots + s)
                rows[f, s] = end - start
                searched_slots[f, s] = searched[f]
        self.register_buffer("block_slot", torch.tensor(slot, dtype=torch.int64), False)
        self.register_buffer("block_rows", rows, False)
        self.register_buffer("searched", searched_slots, False)
        self.register_buffer("dim_mask", torch.ones(num_fields, num_slots, dim), False)

    def table_weights(self) -> torch.Tensor:
        """Every field's table stacked in field order: (total rows, D), row = global id."""
        bags = self.tables.embedding_bags
        return torch.cat([bags[name].weight for name in self.table_names], dim=0)

    def forward(self, features: Features) -> torch.Tensor:
        kjt = in_field_order(features.sparse, self.sparse_names)
        batch_size, dim = features.batch_size, self.dim
        lengths = kjt.lengths()
        segment, gid, block = self.layout.locate(kjt.values(), lengths, batch_size)
        rows = self.table_weights()[gid]  # (N, D)
        scale = (self.alpha * self.dim_mask).view(-1, dim)[self.block_slot[block]]  # (N, D)
        num_sparse = len(self.sparse_names)
        pooled = rows.new_zeros(num_sparse * batch_size, dim).index_add_(0, segment, rows * scale)
        # single ids have length 1 (their row); bags are MEAN-pooled like the per-feature EBC
        pooled = pooled / lengths.clamp(min=1).to(pooled.dtype).unsqueeze(-1)
        emb = pooled.view(num_sparse, batch_size, dim).transpose(0, 1)  # (B, F_sparse, D)
        return self.append_dense(emb, features)  # (B, F, D)

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The embedding-side weights the search trains on train batches (not α)."""
        return [p for name, p in self.named_parameters() if name != "alpha"]


def build_search_model(
    model_config: BaseModel,
    schema: FeatureSchema,
    embedding_config: EmbeddingConfig,
    config: DNISConfig,
) -> CTRModel:
    """The registered model around a `SoftSelectionEmbedding` with α = 1 (on the CPU).

    Its tables are the per-feature ones (same names, init and state-dict keys), so α = 1
    reproduces the per-feature model with the same weights.

    Raises:
        ConfigError: `config.fields` names a field the schema does not have.
    """
    names = schema.sparse_names
    searched_names = set(names if config.fields is None else config.fields)
    unknown = sorted(searched_names - set(names))
    if unknown:
        raise ConfigError(
            f"search.fields: {unknown} are not sparse fields of this dataset (expected some "
            f"of {names})"
        )
    per_feature = build_per_feature_embedding(
        schema, embedding_config.model_copy(update={"variant": "per_feature"})
    )
    searched = [f.name in searched_names for f in schema.sparse]
    ends = [
        frequency_blocks(f.num_embeddings, config.block_fractions) if s else [f.num_embeddings]
        for f, s in zip(schema.sparse, searched, strict=True)
    ]
    layout = BlockLayout([f.num_embeddings for f in schema.sparse], ends)
    embedding = SoftSelectionEmbedding(
        per_feature.tables, layout, ends, searched, names, len(schema.dense), embedding_config.dim
    )
    return build_model(model_config, embedding, schema)


def soft_embedding(model: CTRModel) -> SoftSelectionEmbedding:
    embedding = getattr(model, "embedding", None)
    if not isinstance(embedding, SoftSelectionEmbedding):
        raise ConfigError(
            f"search: the model's `embedding` is {type(embedding).__name__} (expected a "
            f"SoftSelectionEmbedding); build it with build_search_model"
        )
    return embedding


# --- the two alternating steps ----------------------------------------------------------------
def _apply_step(
    model: CTRModel, batch: Batch, params: list[nn.Parameter], optimizer: torch.optim.Optimizer
) -> float:
    """One optimizer step on `params` only: their gradients are taken with autograd.grad, so
    nothing else (α, a frozen network) receives a gradient."""
    loss = model.loss(model(batch.features), batch.labels)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def train_step(model: CTRModel, batch: Batch, optimizer: torch.optim.Optimizer) -> float:
    """A train batch updates the embedding-side weights only (the ones in `optimizer`, built
    by `embedding_optimizer`); the network and α are not touched. Returns the loss."""
    model.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return _apply_step(model, batch, params, optimizer)


def embedding_optimizer(model: CTRModel, lr: float) -> torch.optim.Optimizer:
    """Adam on the embedding-side weights of a search model (not α, not the network)."""
    return torch.optim.Adam(soft_embedding(model).embedding_parameters(), lr=lr)


@torch.no_grad()
def update_alpha(
    alpha: torch.Tensor,
    grad: torch.Tensor,
    searched: torch.Tensor,
    lr: float,
    use_grad_norm: bool = True,
) -> None:
    """One projected SGD step on α in place: optionally normalise each block's gradient by its
    mean absolute value, step, clip to [0, 1]; unsearched blocks do not move.

    Shapes: alpha and grad (F, S, D); searched (F, S) bool.
    """
    if use_grad_norm:
        # g_s <- g_s / (mean_j |g_s,j| + eps): a rare block's small gradient moves α as much
        # as a frequent block's
        grad = grad / (grad.abs().mean(dim=-1, keepdim=True) + GRAD_NORM_EPS)
    grad = grad * searched.unsqueeze(-1).to(grad.dtype)
    alpha.sub_(lr * grad).clamp_(0.0, 1.0)


def alpha_step(
    model: CTRModel, batch: Batch, lr: float, l1: float, use_grad_norm: bool = True
) -> float:
    """A valid batch updates α only: ∂(loss + λ‖α‖₁)/∂α, normalised per block, SGD, clipped.

    Runs in eval mode (no dropout noise in the architecture gradient). Returns the task loss.
    """
    embedding = soft_embedding(model)
    model.eval()
    loss = model.loss(model(batch.features), batch.labels)
    searched = embedding.searched.unsqueeze(-1)
    penalty = l1 * (embedding.alpha.abs() * searched).sum()
    (grad,) = torch.autograd.grad(loss + penalty, [embedding.alpha])
    update_alpha(embedding.alpha, grad, embedding.searched, lr, use_grad_norm)
    return float(loss.detach())


@torch.no_grad()
def evaluate(model: CTRModel, batches: Iterable[Batch]) -> dict[str, float]:
    """Metrics of the model's first trained task over every row of `batches` (AUC over the
    whole split, never averaged over batches)."""
    model.eval()
    task = model.trained_tasks[0]
    probs, labels = [], []
    for batch in batches:
        probs.append(model.probabilities(model(batch.features))[task])
        labels.append(batch.labels[task])
    if not probs:
        raise ConfigError("search: the valid split has no rows (expected at least one)")
    return binary_metrics(torch.cat(labels), torch.cat(probs))


# --- pruning ----------------------------------------------------------------------------------
@torch.no_grad()
def block_scores(embedding: SoftSelectionEmbedding, score: str) -> torch.Tensor:
    """(F, S, D) importance of every (field, block, dim): α itself, or `magnitude`, the mean
    |α_{b,j} e_{i,j}| over the rows i of block b."""
    alpha = embedding.alpha.detach()
    if score == "alpha":
        return alpha.clone()
    if score != "magnitude":
        raise ConfigError(f"search.prune_score: '{score}' (expected 'magnitude' or 'alpha')")
    weights = embedding.table_weights().detach()  # (total rows, D)
    global_ids = torch.arange(weights.shape[0])
    slots = embedding.block_slot[
        torch.bucketize(global_ids, embedding.layout.global_end, right=True)
    ]
    scaled = weights.abs() * alpha.view(-1, embedding.dim)[slots]
    sums = torch.zeros(alpha.numel() // embedding.dim, embedding.dim).index_add_(0, slots, scaled)
    counts = torch.bincount(slots, minlength=sums.shape[0]).clamp(min=1)
    return (sums / counts.unsqueeze(-1)).view_as(alpha)


def _keep_top(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mask keeping, in each block, its `counts` highest-scoring dims (ties: lower dim)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(
        -1, order, torch.arange(scores.shape[-1]).expand_as(order).contiguous()
    )
    return ranks < counts.unsqueeze(-1)


def prune_by_threshold(
    alpha: torch.Tensor, searched: torch.Tensor, threshold: float, width_multiple: int = 1
) -> torch.Tensor:
    """Keeps the dims with α >= threshold; each block's count is then rounded up to a multiple
    of `width_multiple` with its next-highest α. Unsearched blocks keep every dim.

    Shapes: alpha (F, S, D), searched (F, S) -> mask (F, S, D) bool.
    """
    dim = alpha.shape[-1]
    counts = (alpha >= threshold).sum(dim=-1)
    counts = torch.clamp((counts + width_multiple - 1) // width_multiple * width_multiple, max=dim)
    counts = torch.where(searched, counts, torch.full_like(counts, dim))
    return _keep_top(alpha, counts)


def prune_to_budget(
    scores: torch.Tensor,
    rows: torch.Tensor,
    searched: torch.Tensor,
    budget: float,
    width_multiple: int = 1,
) -> torch.Tensor:
    """Keeps the highest-scoring (block, dim) entries whose table parameters fit `budget`.

    Each block's dims are sorted by score and taken `width_multiple` at a time (a chunk scores
    the mean of its dims); chunks are visited best first, a block's chunks in order, and one
    that does not fit closes its block. Unsearched blocks keep every dim and their cost is
    paid first.

    Shapes: scores (F, S, D), rows (F, S) rows per block (0 for unused slots), searched (F, S)
    -> mask (F, S, D) bool.
    """
    num_fields, num_slots, dim = scores.shape
    if dim % width_multiple:
        raise ConfigError(f"search.width_multiple={width_multiple} must divide embedding.dim={dim}")
    remaining = budget - float((rows * ~searched).sum()) * dim
    ordered = torch.sort(scores, dim=-1, descending=True, stable=True).values
    chunk_scores = ordered.view(num_fields, num_slots, dim // width_multiple, width_multiple)
    chunk_scores = chunk_scores.mean(-1)  # (F, S, C), non-increasing along C
    units = sorted(
        (-float(chunk_scores[f, s, c]), c, f, s)
        for f in range(num_fields)
        for s in range(num_slots)
        if searched[f, s] and rows[f, s] > 0
        for c in range(dim // width_multiple)
    )
    taken = torch.zeros(num_fields, num_slots, dtype=torch.int64)
    closed = torch.zeros(num_fields, num_slots, dtype=torch.bool)
    for _, chunk, f, s in units:
        if closed[f, s] or chunk != taken[f, s]:
            continue
        cost = float(rows[f, s]) * width_multiple
        if cost <= remaining:
            remaining -= cost
            taken[f, s] += 1
        else:
            closed[f, s] = True
    counts = torch.where(searched, taken * width_multiple, torch.full_like(taken, dim))
    return _keep_top(scores, counts)


def masked_param_count(mask: torch.Tensor, rows: torch.Tensor) -> int:
    """Table parameters of a pruned layout: rows x kept dims, summed over the blocks."""
    return int((rows.unsqueeze(-1) * mask).sum())


def spec_from_mask(embedding: SoftSelectionEmbedding, mask: torch.Tensor) -> MixedDimSpec:
    """The `MixedDimSpec` of a pruning mask: every searched field with its blocks' end ids and
    kept dims (each block its own, not necessarily a prefix)."""
    fields: dict[str, tuple[BlockSpec, ...]] = {}
    for f, name in enumerate(embedding.sparse_names):
        if not embedding.searched_fields[f]:
            continue
        fields[name] = tuple(
            BlockSpec(end=end, kept=tuple(int(j) for j in torch.nonzero(mask[f, s]).flatten()))
            for s, end in enumerate(embedding.block_ends[f])
        )
    return MixedDimSpec(fields=fields)


@torch.no_grad()
def folded_state(
    model: CTRModel, mask: torch.Tensor, pruned: CTRModel, prefix: str = "embedding.tables."
) -> dict[str, torch.Tensor]:
    """The searched model's weights in the layout of `pruned` (METHODS.md §7(b)6: "fold α into
    the table"): each (field, block) table holds its block's rows of the field's searched
    table, only the kept columns, each column times its α; a full-width (unsearched) field's
    table is copied with α = 1 folded in; every other weight (the network, dense-feature
    vectors) is copied as is.

    With these weights `pruned` computes exactly what the searched model computes with its
    pruning mask applied (`dim_mask = mask`), so a retrain can start from the searched model
    instead of from scratch.

    Args:
        model: the searched model (from `build_search_model`, after `run_search`).
        mask: (F, S, D) bool, the kept entries (`SearchResult.mask`).
        pruned: the model built from `spec_from_mask(model.embedding, mask)`, on the CPU.
        prefix: where the pruned model's EmbeddingBagCollection sits in its state dict.

    Returns:
        A full state dict for `pruned` (its keys, its shapes).

    Raises:
        ConfigError: `pruned` has a weight the searched model cannot supply (another
            architecture or another spec).
    """
    embedding = soft_embedding(model)
    alpha = embedding.alpha.detach() * mask.to(embedding.alpha.dtype)  # (F, S, D)
    searched_state = model.state_dict()
    table_of: dict[str, torch.Tensor] = {}  # pruned table name -> its weight
    for f in range(len(embedding.sparse_names)):
        weight = embedding.tables.embedding_bags[embedding.table_names[f]].weight.detach()
        if not embedding.searched_fields[f]:
            table_of[embedding.table_names[f]] = weight * alpha[f, 0]
            continue
        starts = [0, *embedding.block_ends[f][:-1]]
        for s, (start, end) in enumerate(zip(starts, embedding.block_ends[f], strict=True)):
            kept = torch.nonzero(mask[f, s]).flatten()
            if kept.numel():
                table = f"{embedding.table_names[f]}__b{s}"
                table_of[table] = weight[start:end][:, kept] * alpha[f, s, kept]
    state: dict[str, torch.Tensor] = {}
    for key, target in pruned.state_dict().items():
        table = key[len(prefix) :].split(".")[1] if key.startswith(prefix) else None
        if table is not None and key.endswith(".weight") and table in table_of:
            source = table_of[table]
        elif key in searched_state:
            source = searched_state[key]
        else:
            raise ConfigError(
                f"search: the pruned model's weight {key} has no counterpart in the searched "
                f"model; build the pruned model from the searched model's spec and config"
            )
        if source.shape != target.shape:
            raise ConfigError(
                f"search: the searched weight for {key} is {tuple(source.shape)} (expected "
                f"{tuple(target.shape)}); build the pruned model from this search's spec"
            )
        state[key] = source.detach().clone().contiguous()
    return state


# --- the whole search -------------------------------------------------------------------------
@dataclass
class SearchData:
    """Where the search's batches come from.

    Attributes:
        train_epoch: epoch number (from 1) -> that epoch's shuffled train batches.
        valid_stream: an endless stream of valid batches for the α steps.
        valid_eval: a fresh pass over every valid row, for the AUC.
    """

    train_epoch: Callable[[int], Iterable[Batch]]
    valid_stream: Iterator[Batch]
    valid_eval: Callable[[], Iterable[Batch]]


@dataclass
class SearchResult:
    """What the search found (all on the CPU, JSON-able through `summary`)."""

    spec: MixedDimSpec
    alpha: torch.Tensor  # (F, S, D)
    scores: torch.Tensor  # (F, S, D), what the budget pruning ranked
    mask: torch.Tensor  # (F, S, D) bool, the kept entries of `spec`
    params: int
    full_params: int
    curve: list[dict[str, float]]
    warm_history: list[dict[str, float]] = field(default_factory=list)
    search_history: list[dict[str, Any]] = field(default_factory=list)
    blocks: list[dict[str, Any]] = field(default_factory=list)


def warm_start(model: CTRModel, data: SearchData, config: DNISConfig) -> list[dict[str, float]]:
    """Trains every weight but α with Adam, early-stopping on valid AUC; restores the best
    epoch's weights. Returns one record per epoch."""
    embedding = soft_embedding(model)
    params = [p for p in model.parameters() if p is not embedding.alpha]
    optimizer = torch.optim.Adam(params, lr=config.lr_w)
    history: list[dict[str, float]] = []
    best_auc, best_state, bad_epochs = float("-inf"), None, 0
    for epoch in range(1, config.warm_max_epochs + 1):
        model.train()
        losses = [_apply_step(model, batch, params, optimizer) for batch in data.train_epoch(epoch)]
        metrics = evaluate(model, data.valid_eval())
        record = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "valid_auc": metrics["auc"],
            "valid_logloss": metrics["logloss"],
        }
        history.append(record)
        logger.info(
            "warm   epoch=%d loss=%.4f auc=%.4f logloss=%.4f",
            epoch,
            record["train_loss"],
            metrics["auc"],
            metrics["logloss"],
        )
        if metrics["auc"] > best_auc:
            best_auc, best_state, bad_epochs = metrics["auc"], copy.deepcopy(model.state_dict()), 0
        else:
            bad_epochs += 1
            if bad_epochs > config.warm_patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return history


def _alpha_by_block(embedding: SoftSelectionEmbedding) -> dict[str, list[float]]:
    alpha = embedding.alpha.detach().mean(-1)
    return {
        name: [round(float(alpha[f, s]), 4) for s in range(len(embedding.block_ends[f]))]
        for f, name in enumerate(embedding.sparse_names)
        if embedding.searched_fields[f]
    }


def search_alpha(model: CTRModel, data: SearchData, config: DNISConfig) -> list[dict[str, Any]]:
    """Alternating mini-batch steps: a train batch for the embedding-side weights, then a valid
    batch for α. Returns one record per epoch (losses, valid AUC, mean α per block)."""
    embedding = soft_embedding(model)
    optimizer = embedding_optimizer(model, config.lr_w)
    history: list[dict[str, Any]] = []
    for epoch in range(1, config.search_epochs + 1):
        train_losses, valid_losses = [], []
        for step, batch in enumerate(data.train_epoch(epoch)):
            if config.steps_per_epoch is not None and step >= config.steps_per_epoch:
                break
            train_losses.append(train_step(model, batch, optimizer))
            valid_batch = next(data.valid_stream)
            valid_losses.append(
                alpha_step(model, valid_batch, config.lr_alpha, config.l1, config.use_grad_norm)
            )
        metrics = evaluate(model, data.valid_eval())
        alpha = embedding.alpha.detach()[embedding.searched]
        record = {
            "epoch": epoch,
            "steps": len(train_losses),
            "train_loss": float(np.mean(train_losses)) if train_losses else float("nan"),
            "alpha_loss": float(np.mean(valid_losses)) if valid_losses else float("nan"),
            "valid_auc": metrics["auc"],
            "alpha_mean": float(alpha.mean()),
            "alpha_zero_share": float((alpha == 0).float().mean()),
            "alpha_by_block": _alpha_by_block(embedding),
        }
        history.append(record)
        logger.info(
            "search epoch=%d steps=%d loss=%.4f alpha_loss=%.4f auc=%.4f alpha_mean=%.3f "
            "alpha_zero=%.3f",
            epoch,
            record["steps"],
            record["train_loss"],
            record["alpha_loss"],
            metrics["auc"],
            record["alpha_mean"],
            record["alpha_zero_share"],
        )
    return history


@torch.no_grad()
def pruning_sweep(
    model: CTRModel,
    data: SearchData,
    scores: torch.Tensor,
    ratios: Sequence[float],
    width_multiple: int,
) -> list[dict[str, float]]:
    """Valid AUC of the searched model with its entries pruned to each parameter share (no
    retraining): the AUC-vs-parameters curve."""
    embedding = soft_embedding(model)
    full = float(embedding.block_rows.sum()) * embedding.dim
    curve = []
    try:
        for ratio in sorted(set(ratios), reverse=True):
            mask = prune_to_budget(
                scores, embedding.block_rows, embedding.searched, ratio * full, width_multiple
            )
            embedding.dim_mask.copy_(mask)
            metrics = evaluate(model, data.valid_eval())
            params = masked_param_count(mask, embedding.block_rows)
            curve.append(
                {
                    "ratio": ratio,
                    "params": params,
                    "valid_auc": metrics["auc"],
                    "valid_logloss": metrics["logloss"],
                }
            )
            logger.info(
                "sweep  ratio=%.2f params=%d auc=%.4f logloss=%.4f",
                ratio,
                params,
                metrics["auc"],
                metrics["logloss"],
            )
    finally:
        embedding.dim_mask.fill_(1.0)
    return curve


def _block_summary(embedding: SoftSelectionEmbedding, mask: torch.Tensor) -> list[dict[str, Any]]:
    rows = []
    for f, name in enumerate(embedding.sparse_names):
        for s, end in enumerate(embedding.block_ends[f]):
            rows.append(
                {
                    "field": name,
                    "block": s,
                    "end": end,
                    "rows": int(embedding.block_rows[f, s]),
                    "kept": int(mask[f, s].sum()),
                    "alpha_mean": float(embedding.alpha[f, s].detach().mean()),
                    "searched": embedding.searched_fields[f],
                }
            )
    return rows


def run_search(model: CTRModel, data: SearchData, config: DNISConfig) -> SearchResult:
    """Warm start, alternating search, pruning sweep and the final pruning of a search model
    (from `build_search_model`)."""
    embedding = soft_embedding(model)
    if embedding.dim % config.width_multiple:
        raise ConfigError(
            f"search.width_multiple={config.width_multiple} must divide "
            f"embedding.dim={embedding.dim}"
        )
    with torch.no_grad():
        embedding.alpha.fill_(1.0)
    warm = warm_start(model, data, config)
    history = search_alpha(model, data, config)
    scores = block_scores(embedding, config.prune_score)
    curve = pruning_sweep(model, data, scores, config.sweep_ratios, config.width_multiple)
    full = int(embedding.block_rows.sum()) * embedding.dim
    if config.prune_threshold is not None:
        mask = prune_by_threshold(
            embedding.alpha.detach(),
            embedding.searched,
            config.prune_threshold,
            config.width_multiple,
        )
    else:
        assert config.target_ratio is not None  # the config validator requires one of them
        mask = prune_to_budget(
            scores,
            embedding.block_rows,
            embedding.searched,
            config.target_ratio * full,
            config.width_multiple,
        )
    params = masked_param_count(mask, embedding.block_rows)
    logger.info("pruned to %d of %d table parameters (%.1f%%)", params, full, 100 * params / full)
    return SearchResult(
        spec=spec_from_mask(embedding, mask),
        alpha=embedding.alpha.detach().clone(),
        scores=scores,
        mask=mask,
        params=params,
        full_params=full,
        curve=curve,
        warm_history=warm,
        search_history=history,
        blocks=_block_summary(embedding, mask),
    )
