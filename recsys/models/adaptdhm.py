"""AdaptDHM: multi-domain CTR by clustering samples on their distribution, one tower per cluster.

Data flow: Features -> injected field embedding (B, F, D) -> flatten (B, F*D) -> shared bottom
MLP (B, H) -> distribution router (K unit-norm centres kept as buffers, updated by an EMA of the
routed rows, never by gradient) -> hard cluster k*(i) -> product-weight tower k* -> the "ctr"
logit. The file holds `AdaptDHMConfig`, the private router and towers, the model and
`occupancy_entropy`; the registry maps the name "adaptdhm" to the config and the model.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.nn import functional as F

from recsys.embeddings.per_feature import FieldEmbedding
from recsys.features.batch import Features
from recsys.features.schema import FeatureSchema
from recsys.models.layers import (
    build_mlp,
    check_ctr_inputs,
    grouped_tower_logits,
    linear_init_,
    mlp_output_dim,
    tower_dims,
)
from recsys.models.outputs import CTRModel, ModelOutput


class AdaptDHMConfig(BaseModel):
    """Hyperparameters of AdaptDHM (the registry key is `name`).

    Args:
        name: registry discriminator, always "adaptdhm".
        num_clusters: number K of learned distributions (clusters), one tower each.
        ema_beta: centre momentum beta in c_k <- normalise(beta c_k + (1 - beta) m_k), in [0, 1).
        routing_iterations: EMA routing iterations T per training batch (eval does one pass).
        routing_temperature: tau in r_ik = softmax_k(<x_i, c_k> / tau); both vectors are unit
            norm, so tau sets how sharp the soft assignment used by the EMA is.
        routing_input: route on the shared bottom's output ("bottom") or on the concatenated
            field embeddings ("embedding", the re-implementation's choice); always detached.
        bottom_hidden_units: widths of the shared bottom MLP on the flattened embeddings;
            empty means the towers read the flattened embeddings directly.
        tower_hidden_units: hidden widths of every cluster tower (a final layer gives the logit).
        dropout: dropout rate after every hidden layer (bottom and towers), in [0, 1).
        min_occupancy: a cluster whose EMA share of the training rows falls below this is
            re-seeded to the batch row farthest from the other centres; must be below 1/K;
            0 disables re-seeding (and the data-driven initialisation on the first batch).
        occupancy_beta: momentum of the per-step EMA of each cluster's share of the rows.
        max_centre_similarity: two centres whose cosine similarity exceeds this have merged
            (soft routing pulls centres together, and hard routing between equal centres is
            decided by rounding noise); the less occupied one is re-seeded like an empty
            cluster. 1 disables the check.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Literal["adaptdhm"] = "adaptdhm"
    num_clusters: int = Field(default=3, ge=1)
    ema_beta: float = Field(default=0.9, ge=0.0, lt=1.0)
    routing_iterations: int = Field(default=3, ge=1)
    routing_temperature: float = Field(default=0.05, gt=0.0)
    routing_input: Literal["bottom", "embedding"] = "bottom"
    bottom_hidden_units: tuple[Annotated[int, Field(ge=1)], ...] = (128,)
    tower_hidden_units: tuple[Annotated[int, Field(ge=1)], ...] = (64, 64)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    min_occupancy: float = Field(default=0.05, ge=0.0, lt=1.0)
    occupancy_beta: float = Field(default=0.9, ge=0.0, lt=1.0)
    max_centre_similarity: float = Field(default=0.99, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _occupancy_floor_below_uniform(self) -> AdaptDHMConfig:
        if self.min_occupancy * self.num_clusters >= 1.0:
            raise ValueError(
                f"model.adaptdhm: min_occupancy={self.min_occupancy} must be below "
                f"1/num_clusters={1.0 / self.num_clusters:.4g} (got num_clusters="
                f"{self.num_clusters}), else some cluster is always re-seeded; lower it or "
                f"set 0 to disable re-seeding"
            )
        return self


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class _DistributionRouter(nn.Module):
    """The distribution adaptation module: K unit-norm centres updated by EMA dynamic routing.

    Training forward (all under no_grad, on detached unit-norm rows x_i):
        1. re-seed every cluster whose occupancy EMA is below `min_occupancy`, or whose centre
           has merged with a more occupied one (cosine > `max_centre_similarity`), emptiest
           first, to the batch row least similar to its nearest kept centre;
        2. T times: r = softmax_k(<x, c_k> / tau); m_k = sum_i r_ik x_i / sum_i r_ik;
           c_k <- normalise(beta c_k + (1 - beta) m_k);
        3. r from the final centres; occupancy <- EMA of the hard-assignment shares.
    Eval forward: step 3's r only, no buffer changes, so rows are scored independently.

    Under torch.distributed with world size > 1, the per-cluster sums and counts of step 2,
    the counts of step 3 and the re-seeding candidates of step 1 are reduced over all ranks
    before use, so every rank applies the identical update and the centres stay bitwise
    identical (TorchRec's DDP wrapper does not broadcast buffers). Every rank must therefore
    run the same number of training forwards, as data-parallel training does.

    Shapes: x (B, R) unit-norm -> routing coefficients (B, K), rows summing to 1.
    """

    centres: torch.Tensor  # (K, R), unit-norm rows
    occupancy: torch.Tensor  # (K,), EMA share of training rows; 0 = never trained

    def __init__(self, config: AdaptDHMConfig, dim: int) -> None:
        super().__init__()
        self.num_clusters = config.num_clusters
        self.ema_beta = config.ema_beta
        self.iterations = config.routing_iterations
        self.temperature = config.routing_temperature
        self.min_occupancy = config.min_occupancy
        self.occupancy_beta = config.occupancy_beta
        self.max_similarity = config.max_centre_similarity
        # Buffers, not parameters: no gradient, but saved in state_dict, moved by .to() and
        # exported with the artifact (the re-implementation's plain tensor is none of these).
        self.register_buffer("centres", F.normalize(torch.randn(config.num_clusters, dim), dim=-1))
        # Zero occupancy means "never trained": with min_occupancy > 0 the first training batch
        # seeds every centre from data (a deterministic farthest-first traversal).
        self.register_buffer("occupancy", torch.zeros(config.num_clusters))
        self._needs_rank_sync = True

    def coefficients(self, points: torch.Tensor) -> torch.Tensor:
        """Routing coefficients r (B, K) of unit-norm rows `points` (B, R) for the current
        centres."""
        return torch.softmax(points @ self.centres.T / self.temperature, dim=-1)

    @torch.no_grad()
    def forward(self, points: torch.Tensor) -> torch.Tensor:
        if self.training:
            world = _world_size()
            if world > 1 and self._needs_rank_sync:
                # Ranks seeded alike start alike; this makes it hold for any seeding.
                dist.broadcast(self.centres, src=0)
                dist.broadcast(self.occupancy, src=0)
                self._needs_rank_sync = False
            self._reseed(points, world)
            for _ in range(self.iterations):
                self._ema_step(points, world)
        routing = self.coefficients(points)  # (B, K)
        if self.training:
            self._update_occupancy(routing.argmax(dim=-1), points.shape[0], world)
        return routing

    def _ema_step(self, points: torch.Tensor, world: int) -> None:
        routing = self.coefficients(points)  # (B, K)
        stats = torch.cat([routing.T @ points, routing.sum(dim=0).unsqueeze(-1)], dim=-1)
        if world > 1:
            dist.all_reduce(stats)  # (K, R + 1): global sums and counts, identical everywhere
        sums, counts = stats[:, :-1], stats[:, -1:]
        # The routed rows' weighted mean; an empty cluster (count 0) keeps its centre.
        means = sums / counts.clamp_min(1e-12)
        self.centres.copy_(
            F.normalize(self.ema_beta * self.centres + (1 - self.ema_beta) * means, dim=-1)
        )

    def _update_occupancy(self, clusters: torch.Tensor, num_rows: int, world: int) -> None:
        counts = torch.bincount(clusters, minlength=self.num_clusters).to(self.occupancy.dtype)
        stats = torch.cat([counts, counts.new_tensor([num_rows])])
        if world > 1:
            dist.all_reduce(stats)
        shares = stats[:-1] / stats[-1].clamp_min(1.0)
        self.occupancy.mul_(self.occupancy_beta).add_((1 - self.occupancy_beta) * shares)

    def _merged(self) -> torch.Tensor:
        """(K,) bool: the centres that duplicate a more occupied one (ties: higher index)."""
        merged = torch.zeros(self.num_clusters, dtype=torch.bool, device=self.centres.device)
        if self.max_similarity >= 1.0 or self.min_occupancy <= 0:
            return merged
        similarity = self.centres @ self.centres.T
        order = torch.argsort(-self.occupancy, stable=True).tolist()
        for position, k in enumerate(order):
            for j in order[:position]:
                if not bool(merged[j]) and float(similarity[k, j]) > self.max_similarity:
                    merged[k] = True
                    break
        return merged

    def _reseed(self, points: torch.Tensor, world: int) -> None:
        # identical on every rank: centres and occupancy are
        low = (self.occupancy < self.min_occupancy) | self._merged()
        if not bool(low.any()):
            return
        kept = ~low
        for k in torch.argsort(self.occupancy, stable=True).tolist():
            if not bool(low[k]):
                continue
            if bool(kept.any()):
                nearest = (points @ self.centres[kept].T).amax(dim=-1)  # (B,)
            else:  # nothing to be far from: the first row of the (global) batch
                nearest = points.new_zeros(points.shape[0])
            row = _global_farthest(points, nearest, world)
            if row is None:  # no rows on any rank
                return
            self.centres[k] = row
            kept[k] = True
            # A grace period: the new cluster is judged on the rows it attracts from now on.
            self.occupancy[k] = 1.0 / self.num_clusters


def _global_farthest(
    points: torch.Tensor, nearest: torch.Tensor, world: int
) -> torch.Tensor | None:
    """The row with the lowest `nearest` similarity over all ranks' batches (ties: lowest rank,
    then first row), or None when every rank's batch is empty."""
    if points.shape[0]:
        index = int(torch.argmin(nearest))
        candidate = torch.cat([nearest[index : index + 1], points[index]])
    else:
        candidate = torch.cat([points.new_full((1,), math.inf), points.new_zeros(points.shape[1])])
    if world > 1:
        gathered = [torch.empty_like(candidate) for _ in range(world)]
        dist.all_gather(gathered, candidate)
        table = torch.stack(gathered)  # (world, 1 + R)
        candidate = table[int(torch.argmin(table[:, 0]))]
    if math.isinf(float(candidate[0])):
        return None
    return candidate[1:]


class _ProductTowers(nn.Module):
    """K towers whose layer weights are W^(k) * W^shared (element-wise) and biases
    b^(k) + b^shared, STAR-style; all towers run batched and return one logit each.

    W^(k) starts at ones and b^(k) at zeros, so every tower starts as the shared MLP with
    nn.Linear's init (a product of two random inits would shrink the weights' scale).

    Shapes: hidden (B, H) -> logits (B, K).
    """

    def __init__(
        self, num_clusters: int, in_dim: int, hidden_units: tuple[int, ...], dropout: float
    ) -> None:
        super().__init__()
        self.dropout = dropout
        self.shared_weights = nn.ParameterList()
        self.shared_biases = nn.ParameterList()
        self.cluster_weights = nn.ParameterList()
        self.cluster_biases = nn.ParameterList()
        for layer_in, layer_out in tower_dims(in_dim, hidden_units):
            weight, bias = torch.empty(layer_out, layer_in), torch.empty(layer_out)
            linear_init_(weight, bias)
            self.shared_weights.append(nn.Parameter(weight))
            self.shared_biases.append(nn.Parameter(bias))
            self.cluster_weights.append(nn.Parameter(torch.ones(num_clusters, layer_out, layer_in)))
            self.cluster_biases.append(nn.Parameter(torch.zeros(num_clusters, layer_out)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weights = [w * s for w, s in zip(self.cluster_weights, self.shared_weights, strict=True)]
        biases = [b + s for b, s in zip(self.cluster_biases, self.shared_biases, strict=True)]
        return grouped_tower_logits(hidden, weights, biases, self.dropout, self.training)


class AdaptDHM(CTRModel):
    """AdaptDHM: samples routed to K learned distributions, each with its own tower.

    Paper: Li et al., "AdaptDHM: Adaptive Distribution Hierarchical Model for Multi-Domain CTR
    Prediction", Cainiao/Alibaba 2022, arXiv:2211.12105. No official code; the structure
    follows the abstract and the Scenario-Wise Rec re-implementation (METHODS.md section 4).

    A shared bottom MLP reads the flattened field embeddings. The distribution adaptation
    module routes each (detached, L2-normalised) bottom output to K unit-norm centres by
    dynamic routing; centres follow an EMA of their routed rows and are never trained by
    gradient. Each sample is scored by the tower of its argmax cluster (hard routing). Domain
    ids are not used: clusters are learned from the data.

    Differences from the paper / re-implementation:
        - A shared bottom MLP before routing and towers (the re-implementation feeds the raw
          embeddings to the towers); `bottom_hidden_units=()` and `routing_input="embedding"`
          restore that.
        - Routed rows are L2-normalised and the softmax has a temperature tau (default 0.05):
          unnormalised rows let the routing be dominated by their norm; normalised ones without
          a temperature give near-uniform r, and every centre drifts to the global mean.
        - m_k is the r-weighted mean of the rows, not their sum, so beta keeps its meaning for
          any batch size.
        - Centres (and occupancy) are buffers, all-reduced across ranks before every update.
        - Anti-collapse [ours]: a cluster whose occupancy EMA drops below `min_occupancy` is
          re-seeded to the batch row farthest from the other centres; the same rule seeds all
          centres from the first training batch. `min_occupancy=0` turns both off.
        - Tower biases are used (the re-implementation creates but never applies them);
          cluster weights start at ones (the re-implementation multiplies two Xavier inits).
        - Output is a logit; the sigmoid and the loss live outside forward.

    Shapes: Features with B rows and F fields of width D -> `ModelOutput(logits={"ctr": (B,)},
    extras={"routing": (B, K) coefficients summing to 1, "cluster": (B,) int64 in [0, K)})`.

    Args:
        config: the model hyperparameters.
        embedding: the field embedding, built outside so the trainer can shard it; must give
            schema.num_fields fields of width `embedding.dim`.
        schema: the fitted feature schema; its labels must train the task "ctr".

    Raises:
        ConfigError: the embedding's field count differs from the schema's, or the schema has
            no "ctr" task.

    Example:
        >>> import pyarrow as pa
        >>> from recsys.data.schema import DatasetSchema
        >>> from recsys.embeddings import EmbeddingConfig, build_embedding
        >>> from recsys.features.batch import features_from_rows
        >>> from recsys.features.schema import fit_feature_schema
        >>> dataset = DatasetSchema.model_validate({"name": "toy", "columns": [
        ...     {"name": "user_id", "role": "categorical"},
        ...     {"name": "item_id", "role": "categorical"},
        ...     {"name": "click", "role": "label", "task": "ctr"}]})
        >>> rows = pa.table({"user_id": ["u1", "u2"], "item_id": ["i1", "i2"], "click": [1, 0]})
        >>> schema = fit_feature_schema(dataset, [rows])
        >>> config = AdaptDHMConfig(num_clusters=2, bottom_hidden_units=(8,),
        ...                         tower_hidden_units=(4,))
        >>> model = AdaptDHM(config, build_embedding(schema, EmbeddingConfig(dim=4)), schema)
        >>> output = model.eval()(features_from_rows(schema, [{"user_id": "u1", "item_id": "i9"}]))
        >>> output.logits["ctr"].shape, output.extras["routing"].shape
        (torch.Size([1]), torch.Size([1, 2]))
        >>> tuple(model.router.centres.shape), float(output.extras["routing"].sum())
        ((2, 8), 1.0)
    """

    def __init__(
        self, config: AdaptDHMConfig, embedding: FieldEmbedding, schema: FeatureSchema
    ) -> None:
        super().__init__()
        check_ctr_inputs("model.adaptdhm", embedding, schema)
        self.config = config
        self.embedding = embedding
        flat_dim = schema.num_fields * embedding.dim
        self.bottom = build_mlp(flat_dim, config.bottom_hidden_units, config.dropout)
        hidden_dim = mlp_output_dim(flat_dim, config.bottom_hidden_units)
        route_dim = hidden_dim if config.routing_input == "bottom" else flat_dim
        self.router = _DistributionRouter(config, route_dim)
        self.towers = _ProductTowers(
            config.num_clusters, hidden_dim, config.tower_hidden_units, config.dropout
        )

    def forward(self, features: Features) -> ModelOutput:
        flat = self.embedding(features).flatten(start_dim=1)  # (B, F, D) -> (B, F*D)
        hidden = self.bottom(flat)  # (B, H)
        route_in = (
            self._bottom_without_dropout(flat, hidden)
            if self.config.routing_input == "bottom"
            else flat
        )
        points = F.normalize(route_in.detach().to(self.router.centres.dtype), dim=-1)  # (B, R)
        routing = self.router(points)  # (B, K)
        cluster = routing.argmax(dim=-1)  # (B,)
        tower_logits = self.towers(hidden)  # (B, K)
        logits = tower_logits.gather(1, cluster.unsqueeze(1)).squeeze(1)  # (B,)
        return ModelOutput(logits={"ctr": logits}, extras={"routing": routing, "cluster": cluster})

    def _bottom_without_dropout(self, flat: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The bottom's output as eval computes it, for routing: routed on dropped-out features,
        a training row went to another cluster than eval sends it to (a third of the rows at
        dropout 0.3), and fed the centres noisy points. Routing is detached, so the extra
        pass in training needs no gradient."""
        if not self.training or self.config.dropout == 0.0:
            return hidden
        with torch.no_grad():
            for layer in self.bottom:
                if not isinstance(layer, nn.Dropout):
                    flat = layer(flat)
        return flat


def occupancy_entropy(clusters: torch.Tensor, num_clusters: int) -> float:
    """Entropy of the cluster shares of `clusters` (int ids in [0, K)), divided by log K.

    1.0 means every cluster gets the same share, 0.0 that one cluster gets every row (METHODS.md
    asks for > 0.5). One cluster is trivially balanced (1.0); no rows give 0.0.

    Example:
        >>> round(occupancy_entropy(torch.tensor([0, 1, 2, 0, 1, 2]), 3), 6)
        1.0
        >>> occupancy_entropy(torch.tensor([1, 1, 1]), 3)
        0.0
    """
    if num_clusters == 1:
        return 1.0
    counts = torch.bincount(clusters.flatten().long(), minlength=num_clusters).double()
    if counts.sum() == 0:
        return 0.0
    entropy = torch.special.entr(counts / counts.sum()).sum()  # -sum p log p, 0 log 0 = 0
    return float(entropy / math.log(num_clusters))
