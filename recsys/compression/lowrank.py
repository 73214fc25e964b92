"""Low-rank compression of a trained model by activation PCA (Atomic Feature Mimicking).

Trained artifact + training rows -> streaming float64 statistics (sum y, sum y y^T, count) of
every chosen layer's pre-activation output, gathered by forward hooks (an embedding field's
"output" is its pooled row per training sample, so rows count as often as the data looks them
up) -> PCA by `torch.linalg.eigh` -> ranks (per-layer retained energy, or one energy
threshold for all layers found by search so the whole model meets a size ratio) -> compressed
model: factorised linear layers (recsys/compression/factorized.py) and k_f-wide code tables
(recsys/embeddings/lowrank.py) -> fine-tuning with the task loss at a tenth of the learning
rates, early-stopped on valid AUC. METHODS.md §8. The weight-SVD baseline (`method="svd"`)
factorises the same layers at the same ranks from the weights alone.

The CLI (`recsys compress`, recsys/compression/cli.py) reads the data, calls `compress_model`
and `fine_tune`, and writes the result as a new artifact version.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from tqdm import tqdm

from recsys.compression.factorized import (
    Activation,
    FactorizedLayerSpec,
    FactorizedLinear,
    factorize_modules,
)
from recsys.embeddings import EmbeddingConfig, FieldEmbedding, build_embedding
from recsys.embeddings.config import LowRankSpec
from recsys.embeddings.lowrank import LowRankFieldEmbedding
from recsys.errors import ConfigError, DataError
from recsys.features.batch import Batch, batch_from_encoded
from recsys.features.schema import FeatureSchema
from recsys.metrics import binary_metrics
from recsys.models.outputs import CTRModel
from recsys.models.registry import build_model

logger = logging.getLogger(__name__)

Method = Literal["pca", "svd"]


# ---------------------------------------------------------------------------------------------
# statistics and PCA
# ---------------------------------------------------------------------------------------------


class ActivationStats:
    """Streaming float64 sums of a layer's outputs: count, sum y and sum y y^T.

    Float64 because E[y y^T] - mu mu^T cancels catastrophically in float32 when the mean is
    large next to the spread. Sums (not running means) so that shards from several workers
    combine exactly with `merge` (an all-reduce of the three sums).

    Shapes: `update` takes (..., dim); every leading axis counts as rows.

    Args:
        dim: width of the observed outputs.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, outputs: torch.Tensor) -> None:
        rows = outputs.detach().reshape(-1, self.dim).to(device="cpu", dtype=torch.float64)
        self.count += rows.shape[0]
        self.total += rows.sum(dim=0)
        self.outer += rows.T @ rows  # (dim, dim)

    def merge(self, other: ActivationStats) -> None:
        if other.dim != self.dim:
            raise ValueError(f"stats: cannot merge width {other.dim} into width {self.dim}")
        self.count += other.count
        self.total += other.total
        self.outer += other.outer

    @property
    def mean(self) -> torch.Tensor:
        """mu = E[y], (dim,) float64."""
        return self.total / max(self.count, 1)

    @property
    def covariance(self) -> torch.Tensor:
        """C = E[y y^T] - mu mu^T, the population covariance (divided by the count), float64."""
        if self.count == 0:
            raise ValueError("stats: no rows were observed (expected at least one)")
        mean = self.mean
        cov = self.outer / self.count - torch.outer(mean, mean)
        return (cov + cov.T) / 2  # exactly symmetric for eigh


@dataclass(frozen=True)
class PrincipalComponents:
    """The eigen-decomposition of an output covariance, largest eigenvalue first.

    Attributes:
        eigenvalues: (dim,) float64, descending, clipped at 0 (rounding gives tiny negatives).
        basis: (dim, dim) float64; column j is the direction of eigenvalue j.
        mean: (dim,) float64, mu.
    """

    eigenvalues: torch.Tensor
    basis: torch.Tensor
    mean: torch.Tensor

    def top(self, rank: int) -> torch.Tensor:
        """U_k, the (dim, k) top-k directions."""
        return self.basis[:, :rank]

    def retained_energy(self, rank: int) -> float:
        """Share of the total variance the top-k directions keep (1 for a constant output)."""
        total = float(self.eigenvalues.sum())
        return 1.0 if total <= 0 else float(self.eigenvalues[:rank].sum()) / total

    def discarded_variance(self, rank: int) -> float:
        """Sum of the eigenvalues beyond k: the mean squared reconstruction error at rank k."""
        return float(self.eigenvalues[rank:].sum())


def principal_components(stats: ActivationStats) -> PrincipalComponents:
    """PCA of the observed outputs by `torch.linalg.eigh` (C is symmetric), sorted descending."""
    eigenvalues, eigenvectors = torch.linalg.eigh(stats.covariance)  # ascending
    order = torch.flip(torch.arange(stats.dim), dims=[0])
    return PrincipalComponents(
        eigenvalues=eigenvalues[order].clamp_min(0.0),
        basis=eigenvectors[:, order].contiguous(),
        mean=stats.mean.clone(),
    )


def energy_rank(eigenvalues: torch.Tensor, energy: float) -> int:
    """Smallest k >= 1 whose top-k eigenvalues keep at least `energy` of their sum."""
    total = float(eigenvalues.sum())
    if total <= 0:
        return 1
    cumulative = torch.cumsum(eigenvalues, dim=0) / total
    # the small tolerance keeps energy=1.0 from asking for more than the last eigenvalue
    k = int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=cumulative.dtype)))
    return min(max(k + 1, 1), len(eigenvalues))


# ---------------------------------------------------------------------------------------------
# what can be compressed, and what it costs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One compressible piece of a model: an nn.Linear or one embedding field's table.

    Attributes:
        name: the Linear's module name (`dnn.0`), or `<embedding module>.<field>` for a table.
        kind: "linear" or "embedding".
        in_features: the Linear's input width, or the table's row count.
        out_features: the Linear's output width, or the embedding width D.
        has_bias: the Linear has a bias (False for tables).
        field: the sparse feature of an embedding target.
    """

    name: str
    kind: Literal["linear", "embedding"]
    in_features: int
    out_features: int
    has_bias: bool = False
    field: str | None = None

    @property
    def dense_parameters(self) -> int:
        """Parameters as it is: in x out (+ out for a bias)."""
        return self.in_features * self.out_features + (self.out_features if self.has_bias else 0)

    def parameters_at(self, rank: int) -> int:
        """Parameters once factorised at rank k.

        Linear: k (in + out) + out (B's bias) + k (A's bias, when the layer had one).
        Table of N rows, width D: N k codes + D k (U_f) + D (mu_f).
        """
        if self.kind == "embedding":
            return self.in_features * rank + self.out_features * rank + self.out_features
        return (
            rank * (self.in_features + self.out_features)
            + self.out_features
            + (rank if self.has_bias else 0)
        )

    def saves_at(self, rank: int) -> bool:
        return self.parameters_at(rank) < self.dense_parameters


def find_targets(
    model: nn.Module, include: Iterable[str] = ("*",), exclude: Iterable[str] = ()
) -> list[Target]:
    """The compressible layers of `model` whose names match an `include` pattern and no
    `exclude` pattern (fnmatch, e.g. `dnn.*`, `embedding.*`, `layers.0.*`), in module order.

    A Linear or table qualifies when a rank-1 factorisation would make it smaller (so 1-wide
    output layers never do). Tables are those of the model's per-feature FieldEmbedding.

    Raises:
        ConfigError: the model is already compressed (`refuse_compressed`), or embedding
            fields are selected but the model has no per-feature FieldEmbedding, or more than
            one (one EmbeddingConfig cannot describe both).
    """
    refuse_compressed(model)
    include, exclude = list(include), list(exclude)

    def chosen(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in include) and not any(
            fnmatch.fnmatchcase(name, p) for p in exclude
        )

    targets: list[Target] = []
    embeddings = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, FieldEmbedding)
    ]
    for emb_name, embedding in embeddings:
        if not any(chosen(f"{emb_name}.{name}") for name in embedding.sparse_names):
            continue
        if type(embedding) is not FieldEmbedding or len(embeddings) != 1:
            raise ConfigError(
                f"compression: embedding tables of '{emb_name}' are selected, but only a model "
                f"with one per-feature embedding can be compressed (got "
                f"{[type(m).__name__ for _, m in embeddings]}); exclude them with "
                f"--exclude '{emb_name}.*'"
            )
        fields = [
            Target(
                f"{emb_name}.{cfg.feature_names[0]}",
                "embedding",
                cfg.num_embeddings,
                cfg.embedding_dim,
                field=cfg.feature_names[0],
            )
            for cfg in embedding.tables.embedding_bag_configs()
        ]
        fields = [t for t in fields if chosen(t.name) and t.saves_at(1)]
        targets += fields
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and chosen(name):
            target = Target(
                name, "linear", module.in_features, module.out_features, module.bias is not None
            )
            if target.saves_at(1):
                targets.append(target)
    return targets


def compressed_layers(model: nn.Module) -> list[str]:
    """Names of the modules of `model` that compression wrote: factorised Linear layers and
    low-rank (code table) embeddings. Empty for a model that was never compressed."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, FactorizedLinear | LowRankFieldEmbedding)
    ]


def refuse_compressed(model: nn.Module, embedding_config: EmbeddingConfig | None = None) -> None:
    """Compressing a compressed model again is not supported: its factors and code tables are
    not layers the model config describes, so the compressed copy (built from that config)
    could not hold them. Compress the uncompressed model it was made from.

    Raises:
        ConfigError: `model` has factorised layers or low-rank tables, or `embedding_config`
            is the `lowrank` variant.
    """
    layers = compressed_layers(model)
    if embedding_config is not None and embedding_config.variant == "lowrank":
        layers = layers or ["embedding (variant 'lowrank')"]
    if layers:
        raise ConfigError(
            f"compression: the model is already compressed (got compressed layers "
            f"{layers[:4]}{' ...' if len(layers) > 4 else ''}, expected an uncompressed "
            f"model); compress the uncompressed version it was made from instead, e.g. "
            f"--artifact MODEL_REPO/<name>/<version> of that version"
        )


def _embedding_path(target: Target) -> str:
    assert target.field is not None
    return target.name[: -len(target.field) - 1]


# ---------------------------------------------------------------------------------------------
# statistics pass
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    targets: list[Target],
    batches: Iterable[Batch],
    show_progress: bool = False,
) -> dict[str, ActivationStats]:
    """One pass of `model` (eval mode, no gradients) over `batches`, accumulating every
    target's output statistics through forward hooks.

    Linear targets record their output `W x + b` (before any activation; an attention
    projection's (B, F, out) counts B F rows). Embedding targets record the pooled row of
    their field per sample, from the EmbeddingBagCollection's output: frequent ids weigh as
    often as the data looks them up.
    """
    stats = {t.name: ActivationStats(t.out_features) for t in targets}
    handles = []
    by_embedding: dict[str, list[Target]] = {}
    for t in targets:
        if t.kind == "embedding":
            by_embedding.setdefault(_embedding_path(t), []).append(t)
        else:
            module = model.get_submodule(t.name)
            handles.append(module.register_forward_hook(_linear_hook(stats[t.name])))
    for path, fields in by_embedding.items():
        embedding = model.get_submodule(path)
        assert isinstance(embedding, FieldEmbedding)  # find_targets only yields these
        handles.append(embedding.tables.register_forward_hook(_table_hook(stats, fields)))
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(
            batches, desc="statistics", unit="batch", disable=not show_progress, mininterval=1.0
        ):
            model(batch.features)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return stats


def _linear_hook(stats: ActivationStats) -> Callable[..., None]:
    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        stats.update(output)

    return hook


def _table_hook(stats: dict[str, ActivationStats], fields: list[Target]) -> Callable[..., None]:
    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        pooled = output.to_dict()  # KeyedTensor -> {feature: (B, D)}
        for t in fields:
            stats[t.name].update(pooled[t.field])

    return hook


# ---------------------------------------------------------------------------------------------
# ranks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankPlan:
    """Chosen ranks (None: the target stays dense) and the energy threshold that chose them.

    Attributes:
        ranks: target name -> k, or None when factorising would not save parameters.
        energy: the retained-energy threshold used (None when every rank was pinned).
    """

    ranks: dict[str, int | None]
    energy: float | None


def total_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def planned_parameters(
    total_before: int, targets: list[Target], ranks: dict[str, int | None]
) -> int:
    """The model's parameter count once `ranks` are applied (dense targets unchanged)."""
    after = total_before
    for t in targets:
        k = ranks.get(t.name)
        if k is not None:
            after += t.parameters_at(k) - t.dense_parameters
    return after


def _ranks_at(
    energy: float,
    targets: list[Target],
    components: dict[str, PrincipalComponents],
    pinned: dict[str, int],
) -> dict[str, int | None]:
    ranks: dict[str, int | None] = {}
    for t in targets:
        k = pinned.get(t.name) or energy_rank(components[t.name].eigenvalues, energy)
        ranks[t.name] = k if t.saves_at(k) else None
    return ranks


def choose_ranks(
    targets: list[Target],
    components: dict[str, PrincipalComponents],
    total_before: int,
    energy: float | None = None,
    target_ratio: float | None = None,
    pinned: dict[str, int] | None = None,
) -> RankPlan:
    """Ranks by retained energy, or by a size target.

    With `energy`, each layer keeps its smallest k retaining that share of its output variance
    (METHODS.md §8(c)). With `target_ratio` R, one threshold is shared by all layers and set
    as high as possible while the whole model (every parameter, compressed or not) has at most
    1/R of its original count: the layers then lose comparable shares of their variance, and
    the threshold is the only knob. `pinned` ranks are kept as given. A layer whose chosen
    rank would not make it smaller stays dense.

    When every target is pinned there is nothing to search: the pinned plan is returned if it
    meets the ratio (with `energy` None).

    Raises:
        ConfigError: neither or both of energy / target_ratio, or the ratio is out of reach
            even at rank 1 in every unpinned layer (or with the pinned ranks, when all are).
    """
    pinned = dict(pinned or {})
    unknown = sorted(set(pinned) - {t.name for t in targets})
    if unknown:
        raise ConfigError(
            f"compression: pinned ranks for unknown layer(s) {unknown} (expected one of "
            f"{[t.name for t in targets]})"
        )
    for t in targets:
        if t.name in pinned and not 1 <= pinned[t.name] <= t.out_features:
            raise ConfigError(
                f"compression: pinned rank {t.name}={pinned[t.name]} is out of range "
                f"(expected 1 <= k <= {t.out_features}, the output width)"
            )
    if (energy is None) == (target_ratio is None):
        raise ConfigError(
            "compression: give exactly one of energy (e.g. 0.95) or target_ratio (e.g. 3)"
        )
    if energy is not None:
        return RankPlan(_ranks_at(energy, targets, components, pinned), energy)
    assert target_ratio is not None
    budget = total_before / target_ratio
    # Candidate thresholds: every layer's cumulative energy levels; the size grows with the
    # threshold, so the largest level that fits the budget is the answer.
    levels = sorted(
        {
            round(float(c), 12)
            for t in targets
            if t.name not in pinned
            for c in _cumulative(components[t.name].eigenvalues)
        }
    )
    if targets and not levels:  # every target is pinned: one plan to check, nothing to search
        ranks = _ranks_at(1.0, targets, components, pinned)
        after = planned_parameters(total_before, targets, ranks)
        if after <= budget:
            return RankPlan(ranks, None)
        raise ConfigError(
            f"compression: target ratio {target_ratio:g} is out of reach (got "
            f"{total_before / after:.2f}x with the pinned ranks {pinned}, every selected "
            f"layer is pinned); lower --target-ratio, lower the pinned ranks or select more "
            f"layers"
        )
    best: RankPlan | None = None
    low, high = 0, len(levels) - 1
    while low <= high:
        middle = (low + high) // 2
        ranks = _ranks_at(levels[middle], targets, components, pinned)
        if planned_parameters(total_before, targets, ranks) <= budget:
            best, low = RankPlan(ranks, levels[middle]), middle + 1
        else:
            high = middle - 1
    if best is None:
        smallest = planned_parameters(
            total_before, targets, _ranks_at(0.0, targets, components, pinned)
        )
        raise ConfigError(
            f"compression: target ratio {target_ratio:g} is out of reach (got at most "
            f"{total_before / smallest:.2f}x with rank 1 in every "
            f"{'unpinned' if pinned else 'selected'} layer); lower --target-ratio"
            f"{', lower the pinned ranks' if pinned else ''} or select more layers"
        )
    return best


def _cumulative(eigenvalues: torch.Tensor) -> list[float]:
    total = float(eigenvalues.sum())
    if total <= 0:
        return [1.0]
    return (torch.cumsum(eigenvalues, dim=0) / total).clamp(max=1.0).tolist()


# ---------------------------------------------------------------------------------------------
# building the compressed model
# ---------------------------------------------------------------------------------------------


@dataclass
class CompressedModel:
    """A compressed model and what describes it in an artifact.

    Attributes:
        model: the compressed model (eval mode, CPU).
        embedding_config: the `lowrank` EmbeddingConfig (or the original one when no table
            is factorised).
        description: config.json's `compression` entry (`layers` rebuild the factorised
            Linear layers; the rest records how they were made).
        layers: one row per target: name, kind, shape, rank, retained energy, parameters.
    """

    model: CTRModel
    embedding_config: EmbeddingConfig
    description: dict[str, Any]
    layers: list[dict[str, Any]] = field(default_factory=list)


def linear_factors(
    linear: nn.Linear,
    rank: int,
    method: Method,
    components: PrincipalComponents | None = None,
    activation: Activation | None = None,
) -> FactorizedLinear:
    """The rank-k factorisation of a trained Linear.

    pca (METHODS.md §8(b)): with U = U_k of the output covariance and mu the output mean,
    A = (U^T W, U^T b), B = (U, (I - U U^T) mu); exact at k = out when `activation` is None.
    svd (the baseline): W ~ P_k S_k Q_k^T from the weight alone; A = S_k^1/2 Q_k^T without
    bias, B = (P_k S_k^1/2, b).
    """
    weight = linear.weight.detach().to(torch.float64)  # (out, in)
    bias = None if linear.bias is None else linear.bias.detach().to(torch.float64)
    if method == "pca":
        if components is None:
            raise ValueError("linear_factors: method 'pca' needs the output's components")
        basis = components.top(rank)  # (out, k)
        mean = components.mean
        return FactorizedLinear.from_factors(
            basis.T @ weight,  # (k, in)
            None if bias is None else basis.T @ bias,
            basis,
            mean - basis @ (basis.T @ mean),  # (I - U U^T) mu
            activation,
        )
    left, singular, right_t = torch.linalg.svd(weight, full_matrices=False)
    root = singular[:rank].sqrt()
    return FactorizedLinear.from_factors(
        root[:, None] * right_t[:rank],  # (k, in)
        None,
        left[:, :rank] * root[None, :],  # (out, k)
        torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias,
        activation,
    )


def table_factors(
    table: torch.Tensor, rank: int, method: Method, components: PrincipalComponents | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes (N, k), U_f (D, k), mu_f (D,)) of a trained (N, D) table, all float64.

    pca: U_f = top-k directions of the data-weighted pooled rows, mu_f their mean, codes
    `(E - mu_f) U_f` for every row (seen or not); row-local, so a row-wise shard could rewrite
    its rows alone. svd (the baseline): the table's own truncated SVD, every row weighted
    alike, no mean: U_f = Q_k, codes `E Q_k`, mu_f = 0.
    """
    table = table.detach().to(torch.float64)
    if method == "pca":
        if components is None:
            raise ValueError("table_factors: method 'pca' needs the field's components")
        basis, mean = components.top(rank), components.mean
        return (table - mean) @ basis, basis, mean
    _, _, right_t = torch.linalg.svd(table, full_matrices=False)
    basis = right_t[:rank].T.contiguous()  # (D, k)
    return table @ basis, basis, torch.zeros(table.shape[1], dtype=torch.float64)


def compress_model(
    model: CTRModel,
    model_config: BaseModel,
    embedding_config: EmbeddingConfig,
    schema: FeatureSchema,
    targets: list[Target],
    plan: RankPlan,
    components: dict[str, PrincipalComponents],
    method: Method = "pca",
    ada_act: bool = False,
) -> CompressedModel:
    """Builds the compressed copy of `model` (which is left unchanged).

    Tables of factorised fields become k_f-wide code tables inside a `lowrank` embedding,
    factorised Linear layers become `FactorizedLinear`, every other weight is copied.

    Args:
        model: the trained, unsharded model.
        model_config: its registry config (the compressed model is built from it).
        embedding_config: its embedding config (variant `per_feature` when tables are
            factorised).
        schema: its feature schema.
        targets: the compressible layers (`find_targets`).
        plan: their ranks (`choose_ranks`).
        components: PCA of every target's output (also used for reporting under svd).
        method: "pca" (activation PCA) or "svd" (weight SVD, the baseline).
        ada_act: put a ReLU between A and B of every factorised Linear (the paper's Ada_Act
            variant; not exact, needs fine-tuning).

    Raises:
        ConfigError: `model` is already compressed (`refuse_compressed`), or it does not
            match the model `model_config` and `embedding_config` build.
    """
    refuse_compressed(model, embedding_config)
    activation: Activation | None = "relu" if ada_act else None
    field_ranks = {
        t.field: k
        for t in targets
        if t.field is not None and (k := plan.ranks.get(t.name)) is not None
    }
    new_embedding_config = embedding_config
    if field_ranks:
        new_embedding_config = EmbeddingConfig.model_validate(
            {
                **embedding_config.model_dump(mode="json"),
                "variant": "lowrank",
                "lowrank": LowRankSpec(ranks=field_ranks).model_dump(mode="json"),
            }
        )
    specs = [
        FactorizedLayerSpec(
            name=t.name,
            in_features=t.in_features,
            out_features=t.out_features,
            rank=k,
            first_bias=t.has_bias and method == "pca",
            activation=activation,
        )
        for t in targets
        if t.kind == "linear" and (k := plan.ranks.get(t.name)) is not None
    ]
    new_model = build_model(model_config, build_embedding(schema, new_embedding_config), schema)
    factorize_modules(new_model, specs)

    old_state = model.state_dict()
    new_state: dict[str, torch.Tensor] = {}
    replaced: set[str] = set()
    for spec in specs:
        linear = model.get_submodule(spec.name)
        assert isinstance(linear, nn.Linear)
        factorized = linear_factors(
            linear, spec.rank, method, components.get(spec.name), activation
        )
        for key, value in factorized.state_dict().items():
            new_state[f"{spec.name}.{key}"] = value
        replaced |= {f"{spec.name}.weight", f"{spec.name}.bias"}
    for t in targets:
        k = plan.ranks.get(t.name)
        if t.kind != "embedding" or k is None:
            continue
        path = _embedding_path(t)
        old_embedding, new_embedding = model.get_submodule(path), new_model.get_submodule(path)
        assert isinstance(old_embedding, FieldEmbedding)
        assert isinstance(new_embedding, LowRankFieldEmbedding)
        assert t.field is not None
        table_key = (
            f"{path}.tables.embedding_bags.{_table_of(old_embedding.tables, t.field)}.weight"
        )
        codes, basis, mean = table_factors(old_state[table_key], k, method, components.get(t.name))
        slot = new_embedding.lowrank_names.index(t.field)
        new_state[table_key] = codes
        new_state[f"{path}.projections.{slot}"] = basis
        new_state[f"{path}.means.{slot}"] = mean
        replaced.add(table_key)
    expected = new_model.state_dict()
    for key, value in old_state.items():
        if key not in replaced and key in expected:
            new_state[key] = value
    missing = sorted(set(expected) - set(new_state))
    if missing:
        raise ConfigError(
            f"compression: the model does not match the one its configs build (got no weights "
            f"for {missing[:5]}); pass the model_config and embedding_config it was built "
            f"with, e.g. the artifact's"
        )
    new_model.load_state_dict(
        {k: v.to(dtype=expected[k].dtype) for k, v in new_state.items()}, strict=True
    )
    new_model.eval()

    layers = []
    for t in targets:
        k = plan.ranks.get(t.name)
        pcs = components.get(t.name)
        layers.append(
            {
                "name": t.name,
                "kind": t.kind,
                "shape": [t.in_features, t.out_features],
                "rank": k,
                "retained_energy": None
                if pcs is None
                else pcs.retained_energy(k or t.out_features),
                "params_before": t.dense_parameters,
                "params_after": t.dense_parameters if k is None else t.parameters_at(k),
            }
        )
    description = {
        "method": method,
        "ada_act": ada_act,
        "energy_threshold": plan.energy,
        "ranks": {name: k for name, k in plan.ranks.items() if k is not None},
        "layers": [spec.to_json() for spec in specs],
        "params_before": total_parameters(model),
        "params_after": total_parameters(new_model),
    }
    return CompressedModel(new_model, new_embedding_config, description, layers)


def _table_of(tables: EmbeddingBagCollection, feature: str) -> str:
    for config in tables.embedding_bag_configs():
        if feature in config.feature_names:
            return config.name
    raise ConfigError(f"compression: no table embeds feature '{feature}'")


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict as stored (every tensor's elements x element size)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# ---------------------------------------------------------------------------------------------
# data, evaluation and fine-tuning
# ---------------------------------------------------------------------------------------------


def iter_batches(
    schema: FeatureSchema,
    files: list[Path],
    batch_size: int,
    shuffle_seed: int | None = None,
    chunk_rows: int = 262_144,
) -> Iterator[Batch]:
    """Raw labelled Parquet rows -> Batches, `chunk_rows` rows read and encoded at a time.

    With `shuffle_seed` the files are visited in a random order and rows are shuffled within
    each chunk (the trainer's scheme), so memory stays bounded by a chunk.
    """
    rng = np.random.default_rng(shuffle_seed)
    order = list(files)
    if shuffle_seed is not None:
        order = [order[i] for i in rng.permutation(len(order))]
    for path in order:
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows):
            encoded = schema.encode(pa.Table.from_batches([record_batch]), where=str(path))
            if shuffle_seed is not None:
                encoded = encoded.take(pa.array(rng.permutation(encoded.num_rows)))
            for start in range(0, encoded.num_rows, batch_size):
                yield batch_from_encoded(schema, encoded.slice(start, batch_size))


@torch.no_grad()
def evaluate(
    model: CTRModel, schema: FeatureSchema, files: list[Path], batch_size: int = 8192
) -> dict[str, float]:
    """Metrics of the first labelled task over whole splits (`auc`, `logloss`, ...), plus
    `<task>_auc` for every other served task with labels."""
    model.eval()
    probs: dict[str, list[torch.Tensor]] = {}
    labels: dict[str, list[torch.Tensor]] = {}
    for batch in iter_batches(schema, files, batch_size):
        output = model.probabilities(model(batch.features))
        for task, p in output.items():
            if task in batch.labels:
                probs.setdefault(task, []).append(p)
                labels.setdefault(task, []).append(batch.labels[task])
    metrics: dict[str, float] = {}
    first = next(
        (label.task_name for label in schema.dataset.labels if label.task_name in probs), None
    )
    if first is None:
        raise ConfigError(
            f"compression: the data has no label of a served task (expected one of "
            f"{list(model.served_tasks)})"
        )
    for task in probs:
        values = binary_metrics(torch.cat(labels[task]), torch.cat(probs[task]))
        if task == first:
            metrics.update(values)
        metrics[f"{task}_auc"] = values["auc"]
    return metrics


class FineTuneConfig(BaseModel):
    """Fine-tuning of a compressed model (METHODS.md §8(b) step 5).

    Args:
        epochs: passes over train (0 skips fine-tuning).
        dense_lr: Adam learning rate of non-table parameters (the project's 1e-3 / 10).
        table_lr: row-wise Adagrad learning rate of the tables (the project's 0.05 / 10).
        batch_size: rows per step.
        patience: epochs without a better valid AUC before stopping.
        seed: shuffling and dropout seed.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(2, ge=0)
    dense_lr: float = Field(1e-4, gt=0)
    table_lr: float = Field(5e-3, gt=0)
    batch_size: int = Field(1024, ge=1)
    patience: int = Field(1, ge=0)
    seed: int = 0


@dataclass
class FineTuneResult:
    """Valid metrics per epoch (epoch 0: before fine-tuning) and the epoch kept."""

    history: list[dict[str, float]]
    best_epoch: int

    @property
    def best(self) -> dict[str, float]:
        return self.history[self.best_epoch]


def fine_tune(
    model: CTRModel,
    schema: FeatureSchema,
    train_files: list[Path],
    valid_files: list[Path],
    config: FineTuneConfig,
    show_progress: bool = False,
) -> FineTuneResult:
    """Trains `model` in place with its task loss and keeps the epoch with the best valid AUC
    (epoch 0, the model as given, included: fine-tuning never makes it worse on valid).

    Tables train with a row-wise Adagrad and the rest with Adam, as in training, each at its
    own learning rate.
    """
    torch.manual_seed(config.seed)
    table_params = [
        p for m in model.modules() if isinstance(m, EmbeddingBagCollection) for p in m.parameters()
    ]
    table_ids = {id(p) for p in table_params}
    dense_params = [p for p in model.parameters() if id(p) not in table_ids]
    optimizers: list[torch.optim.Optimizer] = [torch.optim.Adam(dense_params, lr=config.dense_lr)]
    if table_params:
        optimizers.append(RowWiseAdagrad(table_params, lr=config.table_lr, eps=1e-8))
    history = [evaluate(model, schema, valid_files)]
    best_epoch, best_state = 0, _clone_state(model)
    logger.info("fine-tune epoch=0 valid auc=%.4f", history[0]["auc"])
    for epoch in range(1, config.epochs + 1):
        model.train()
        loss_sum, steps = 0.0, 0
        batches = iter_batches(
            schema, train_files, config.batch_size, shuffle_seed=config.seed + epoch
        )
        for batch in tqdm(
            batches,
            desc=f"fine-tune {epoch}",
            unit="batch",
            disable=not show_progress,
            mininterval=1.0,
        ):
            loss = model.loss(model(batch.features), batch.labels)
            for optimizer in optimizers:
                optimizer.zero_grad()
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            loss_sum += float(loss.detach())
            steps += 1
        history.append(evaluate(model, schema, valid_files))
        logger.info(
            "fine-tune epoch=%d loss=%.4f valid auc=%.4f",
            epoch,
            loss_sum / max(steps, 1),
            history[-1]["auc"],
        )
        if history[-1]["auc"] > history[best_epoch]["auc"]:
            best_epoch, best_state = epoch, _clone_state(model)
        elif epoch - best_epoch > config.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return FineTuneResult(history, best_epoch)


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def rank_summary(layers: list[dict[str, Any]]) -> str:
    """A per-layer table: name, shape, rank (`dense` when kept), retained energy, parameters."""
    lines = [f"{'layer':<28} {'shape':>11} {'rank':>5} {'energy':>7} {'params':>17}"]
    for row in layers:
        shape = "x".join(str(s) for s in row["shape"])
        rank = "dense" if row["rank"] is None else str(row["rank"])
        energy = row["retained_energy"]
        energy_text = "-" if energy is None or row["rank"] is None else f"{energy:.3f}"
        lines.append(
            f"{row['name']:<28} {shape:>11} {rank:>5} {energy_text:>7} "
            f"{row['params_before']:>8}->{row['params_after']:<8}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the whole procedure
# ---------------------------------------------------------------------------------------------


class CompressionOptions(BaseModel):
    """What `compress_trained_model` does.

    Args:
        method: "pca" (activation PCA, METHODS.md §8) or "svd" (weight SVD baseline).
        target_ratio: the whole model (every parameter) must shrink at least this many times;
            one retained-energy threshold, shared by all selected layers, is searched for.
        energy: instead of a ratio, each selected layer keeps this share of its output
            variance. Exactly one of target_ratio and energy is set.
        include: fnmatch patterns of the layers to compress (`*`: every Linear that can
            shrink and every embedding field).
        exclude: fnmatch patterns of layers to keep dense (e.g. `dnn.0`, `embedding.gender`).
        ranks: pinned ranks (layer name -> k); the others are chosen.
        ada_act: ReLU between the two factors of each Linear (the paper's Ada_Act).
        fine_tune: the fine-tuning settings (epochs 0 skips it).
        compare_svd: also build, fine-tune and evaluate the weight-SVD baseline at the same
            ranks (reported, not exported).
        stats_batch_size: rows per forward pass of the statistics pass and evaluations.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Method = "pca"
    target_ratio: float | None = Field(None, gt=1.0)
    energy: float | None = Field(None, gt=0.0, le=1.0)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    ranks: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)
    ada_act: bool = False
    fine_tune: FineTuneConfig = Field(default_factory=lambda: FineTuneConfig.model_validate({}))
    compare_svd: bool = False
    stats_batch_size: int = Field(8192, ge=1)

    @model_validator(mode="after")
    def _one_rank_rule(self) -> CompressionOptions:
        if (self.target_ratio is None) == (self.energy is None):
            raise ValueError(
                f"compression: set exactly one of target_ratio and energy (got target_ratio="
                f"{self.target_ratio}, energy={self.energy}); e.g. --target-ratio 3"
            )
        return self


@dataclass
class CompressionRun:
    """The outcome of `compress_trained_model`.

    Attributes:
        compressed: the compressed (and fine-tuned) model with its artifact description.
        metrics: split -> stage -> metrics, stages `original`, `compressed` (before
            fine-tuning) and `fine_tuned`; with compare_svd also `svd_compressed` and
            `svd_fine_tuned`.
        sizes: parameters and state bytes before and after (`params_before`, ...), and of the
            SVD baseline when built.
        fine_tune: the fine-tuning history (None when skipped).
    """

    compressed: CompressedModel
    metrics: dict[str, dict[str, dict[str, float]]]
    sizes: dict[str, float]
    fine_tune: FineTuneResult | None


def compress_trained_model(
    model: CTRModel,
    model_config: BaseModel,
    embedding_config: EmbeddingConfig,
    schema: FeatureSchema,
    splits: dict[str, list[Path]],
    options: CompressionOptions,
    show_progress: bool = False,
) -> CompressionRun:
    """Statistics on train -> ranks -> compressed model -> fine-tuning, with valid/test metrics
    after every stage. `model` is not modified.

    Args:
        model: the trained, unsharded model (e.g. `load_artifact(p).model`).
        model_config: its registry config.
        embedding_config: its embedding config.
        schema: its feature schema; it encodes the raw rows.
        splits: raw labelled Parquet files of `train`, `valid` and `test`.
        options: method, rank rule, layers and fine-tuning.
        show_progress: tqdm bars for the statistics pass and fine-tuning.

    Raises:
        ConfigError: the model is already compressed, no layer can be compressed, or the rank
            rule cannot be met.
        DataError: the train split has no rows.
    """
    targets = find_targets(model, options.include, options.exclude)
    if not targets:
        raise ConfigError(
            f"compression: no layer matches include={list(options.include)} and "
            f"exclude={list(options.exclude)} (or none would shrink); widen --include"
        )
    logger.info("statistics of %d layers over %s", len(targets), [p.name for p in splits["train"]])
    stats = collect_statistics(
        model,
        targets,
        iter_batches(schema, splits["train"], options.stats_batch_size),
        show_progress=show_progress,
    )
    if any(s.count == 0 for s in stats.values()):
        raise DataError(
            f"compression: the train split has no rows (got {[str(p) for p in splits['train']]}, "
            f"expected at least one); pass --data with the folder the model was trained on"
        )
    components = {name: principal_components(s) for name, s in stats.items()}
    params_before = total_parameters(model)
    plan = choose_ranks(
        targets,
        components,
        params_before,
        energy=options.energy,
        target_ratio=options.target_ratio,
        pinned=dict(options.ranks),
    )
    logger.info("energy threshold %s", plan.energy)

    def scores(candidate: CTRModel) -> dict[str, dict[str, float]]:
        return {
            split: evaluate(candidate, schema, splits[split], options.stats_batch_size)
            for split in ("valid", "test")
        }

    metrics: dict[str, dict[str, dict[str, float]]] = {"valid": {}, "test": {}}

    def record(stage: str, values: dict[str, dict[str, float]]) -> None:
        for split, split_metrics in values.items():
            metrics[split][stage] = split_metrics
        logger.info(
            "%-15s valid auc=%.4f test auc=%.4f",
            stage,
            values["valid"]["auc"],
            values["test"]["auc"],
        )

    record("original", scores(model))
    methods: list[Method] = [options.method]
    if options.compare_svd and options.method != "svd":
        methods.append("svd")
    sizes: dict[str, float] = {"params_before": params_before, "bytes_before": state_bytes(model)}
    result: CompressedModel | None = None
    tuned: FineTuneResult | None = None
    for method in methods:
        prefix = "" if method == options.method else f"{method}_"
        built = compress_model(
            model,
            model_config,
            embedding_config,
            schema,
            targets,
            plan,
            components,
            method=method,
            ada_act=options.ada_act,
        )
        sizes[f"{prefix}params_after"] = total_parameters(built.model)
        sizes[f"{prefix}bytes_after"] = state_bytes(built.model)
        record(f"{prefix}compressed", scores(built.model))
        run = None
        if options.fine_tune.epochs > 0:
            run = fine_tune(
                built.model,
                schema,
                splits["train"],
                splits["valid"],
                options.fine_tune,
                show_progress=show_progress,
            )
            record(f"{prefix}fine_tuned", scores(built.model))
        if method == options.method:
            result, tuned = built, run
    assert result is not None
    return CompressionRun(result, metrics, sizes, tuned)
