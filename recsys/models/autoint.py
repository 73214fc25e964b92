"""AutoInt: CTR prediction by stacked multi-head self-attention over the field axis.

Data flow: Features -> injected field embedding (B, F, D) -> interacting layers (B, F, H*d')
-> flatten -> linear -> the "ctr" logit (AutoInt+ adds the logit of a DNN on the flattened
embeddings). The file holds the config (`AutoIntConfig`), the private interacting layer and
the model; the registry (`recsys.models.registry`) maps the name "autoint" to both.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from recsys.embeddings.per_feature import FieldEmbedding
from recsys.features.batch import Features
from recsys.features.schema import FeatureSchema
from recsys.models.layers import check_ctr_inputs
from recsys.models.outputs import CTRModel, ModelOutput


class AutoIntConfig(BaseModel):
    """Hyperparameters of AutoInt / AutoInt+ (the registry key is `name`).

    Args:
        name: registry discriminator, always "autoint".
        num_layers: number L of stacked interacting layers.
        num_heads: number H of attention heads per layer; must divide attention_dim.
        attention_dim: total output width H*d' of every interacting layer (d' per head).
        variant: "paper" follows the paper's equations (linear projections without bias, no
            scaling, no layer norm); "official" follows the authors' TensorFlow code (ReLU
            dense projections with bias, scores divided by sqrt(d'), layer norm at the end).
        use_scale: divide the paper variant's scores by sqrt(d') (the official variant always
            does).
        use_residual: add the projected input E W_res before the ReLU.
        attention_dropout: dropout rate on the attention weights, in [0, 1); training only.
        dnn_hidden_units: hidden widths of the AutoInt+ DNN on the flattened embeddings;
            empty means plain AutoInt. Each width must be >= 1.
        dnn_dropout: dropout rate after each DNN hidden layer, in [0, 1); training only.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Literal["autoint"] = "autoint"
    num_layers: int = Field(default=3, ge=1)
    num_heads: int = Field(default=2, ge=1)
    attention_dim: int = Field(default=64, ge=1)
    variant: Literal["paper", "official"] = "paper"
    use_scale: bool = False
    use_residual: bool = True
    attention_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    dnn_hidden_units: tuple[Annotated[int, Field(ge=1)], ...] = ()
    dnn_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> AutoIntConfig:
        if self.attention_dim % self.num_heads:
            raise ValueError(
                f"model.autoint: attention_dim={self.attention_dim} must be divisible by "
                f"num_heads={self.num_heads} (got remainder "
                f"{self.attention_dim % self.num_heads}); set attention_dim to num_heads times "
                f"the per-head width"
            )
        return self

    @property
    def head_dim(self) -> int:
        """Per-head width d' = attention_dim / num_heads."""
        return self.attention_dim // self.num_heads


class _InteractingLayer(nn.Module):
    """One interacting layer: multi-head self-attention across fields plus a residual.

    Paper variant, for every head h (W_Q^h, W_K^h, W_V^h are the columns of one projection
    that belong to head h, so heads split the width, never the fields):
        Q_h = E W_Q^h,  K_h = E W_K^h,  V_h = E W_V^h                (B, F, d')
        A_h = softmax(Q_h K_h^T) over keys                           (B, F, F)
        E'  = ReLU(concat_h(A_h V_h) + E W_res)                      (B, F, H*d')
    The official variant puts ReLU (with bias) on the four projections, divides the scores by
    sqrt(d') and applies layer norm to E'. Dropout on A_h acts on the product A_h V_h only; the
    returned weights are the softmax itself, so their rows always sum to 1.

    Shapes: (B, F, in_dim) -> (B, F, attention_dim), and weights (B, H, F, F) on request.

    Args:
        in_dim: input width (D for the first layer, attention_dim afterwards).
        config: the model config (heads, width, variant, scaling, residual, dropout).
    """

    def __init__(self, in_dim: int, config: AutoIntConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.is_official = config.variant == "official"
        self.use_scale = config.use_scale or self.is_official
        width = config.attention_dim
        self.query = nn.Linear(in_dim, width, bias=self.is_official)
        self.key = nn.Linear(in_dim, width, bias=self.is_official)
        self.value = nn.Linear(in_dim, width, bias=self.is_official)
        # Always a projection, also when in_dim == width, as in the paper's E W_res.
        self.residual = (
            nn.Linear(in_dim, width, bias=self.is_official) if config.use_residual else None
        )
        self.attention_dropout = nn.Dropout(config.attention_dropout)
        self.layer_norm = nn.LayerNorm(width) if self.is_official else None

    def _project(self, linear: nn.Linear, emb: torch.Tensor) -> torch.Tensor:
        projected = linear(emb)
        return torch.relu(projected) if self.is_official else projected

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch_size, num_fields, _ = x.shape
        x = x.view(batch_size, num_fields, self.num_heads, self.head_dim)  # (B, F, H, d')
        return x.transpose(1, 2)  # (B, H, F, d')

    def forward(
        self, emb: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, F, in_dim) -> ((B, F, H*d'), attention weights (B, H, F, F) or None)."""
        batch_size, num_fields, _ = emb.shape
        query = self._split_heads(self._project(self.query, emb))  # (B, H, F, d')
        key = self._split_heads(self._project(self.key, emb))  # (B, H, F, d')
        value = self._split_heads(self._project(self.value, emb))  # (B, H, F, d')
        # The scores are built transposed, keys on the second-to-last axis: torch's CPU
        # softmax over a last axis of a few fields is slow (1024 rows, 2 heads, 8 fields:
        # 3.5 ms forward and backward over the last axis, 0.8 ms over the one before), and
        # this layer is most of AutoInt's step. The same softmax, the same products.
        scores_t = key @ query.transpose(-1, -2)  # (B, H, F keys, F queries)
        if self.use_scale:
            scores_t = scores_t / math.sqrt(self.head_dim)
        weights_t = torch.softmax(scores_t, dim=-2)  # over keys: each query's column sums to 1
        heads = self.attention_dropout(weights_t).transpose(-1, -2) @ value  # (B, H, F, d')
        weights = weights_t.transpose(-1, -2)  # (B, H, F queries, F keys)
        out = heads.transpose(1, 2).reshape(batch_size, num_fields, -1)  # (B, F, H*d')
        if self.residual is not None:
            out = out + self._project(self.residual, emb)
        out = torch.relu(out)
        if self.layer_norm is not None:
            out = self.layer_norm(out)
        return out, (weights if need_weights else None)


class AutoInt(CTRModel):
    """AutoInt / AutoInt+: explicit feature interactions by self-attention over fields.

    Paper: Song et al., "AutoInt: Automatic Feature Interaction Learning via Self-Attentive
    Neural Networks", CIKM 2019, arXiv:1810.11921.

    Each interacting layer lets every field attend to every other field, so L stacked layers
    model interactions up to order L+1. The last layer's output is flattened and a linear layer
    gives the logit; AutoInt+ (`dnn_hidden_units` non-empty) adds the logit of a plain ReLU DNN
    run on the flattened embeddings.

    Differences from the paper:
        - Two variants, chosen explicitly: "paper" (the equations) and "official" (the authors'
          TF code: ReLU dense projections with bias, scaled scores, layer norm with PyTorch's
          eps 1e-5 instead of the code's 1e-8). The paper variant can scale with `use_scale`.
        - The residual is always a projection E W_res, even when the input width equals
          attention_dim (the equation's form; FuxiCTR uses an identity there).
        - `attention_dropout` applies in both variants (the paper has none; 0 reproduces it).
        - The embedding is injected (multi-hot fields MEAN-pooled, dense fields `v_f * x_f`, as
          in the paper); there is no embedding dropout and no wide (first-order) term.
        - Output is a logit; the sigmoid and the loss live outside forward.

    Shapes: Features with B rows and F = schema.num_fields fields of width D ->
    `ModelOutput(logits={"ctr": (B,)}, extras={"attention": (B, H, F, F)})`, the attention
    weights of the last layer.

    Args:
        config: the model hyperparameters; attention_dim must be divisible by num_heads.
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
        >>> config = AutoIntConfig(num_layers=2, num_heads=2, attention_dim=8)
        >>> model = AutoInt(config, build_embedding(schema, EmbeddingConfig(dim=4)), schema)
        >>> output = model(features_from_rows(schema, [{"user_id": "u1", "item_id": "i9"}]))
        >>> output.logits["ctr"].shape, output.extras["attention"].shape
        (torch.Size([1]), torch.Size([1, 2, 2, 2]))
    """

    def __init__(
        self, config: AutoIntConfig, embedding: FieldEmbedding, schema: FeatureSchema
    ) -> None:
        super().__init__()
        check_ctr_inputs("model.autoint", embedding, schema)
        num_fields = schema.num_fields
        self.config = config
        self.embedding = embedding
        in_dims = [embedding.dim] + [config.attention_dim] * (config.num_layers - 1)
        self.layers = nn.ModuleList(_InteractingLayer(in_dim, config) for in_dim in in_dims)
        self.output = nn.Linear(num_fields * config.attention_dim, 1)
        self.dnn = (
            _build_dnn(num_fields * embedding.dim, config.dnn_hidden_units, config.dnn_dropout)
            if config.dnn_hidden_units
            else None
        )

    def forward(self, features: Features) -> ModelOutput:
        emb = self.embedding(features)  # (B, F, D)
        hidden = emb
        attention: torch.Tensor | None = None
        for index, layer in enumerate(self.layers):
            hidden, attention = layer(hidden, need_weights=index == len(self.layers) - 1)
        assert attention is not None  # num_layers >= 1, and the last layer returns weights
        logits = self.output(hidden.flatten(start_dim=1)).squeeze(-1)  # (B, F*H*d') -> (B,)
        if self.dnn is not None:
            logits = logits + self.dnn(emb.flatten(start_dim=1)).squeeze(-1)  # (B, F*D) -> (B,)
        return ModelOutput(logits={"ctr": logits}, extras={"attention": attention})


def _build_dnn(in_dim: int, hidden_units: tuple[int, ...], dropout: float) -> nn.Sequential:
    """The AutoInt+ DNN: [Linear -> ReLU -> Dropout] per hidden width, then Linear -> 1."""
    blocks: list[nn.Module] = []
    for width in hidden_units:
        blocks += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = width
    blocks.append(nn.Linear(in_dim, 1))
    return nn.Sequential(*blocks)
