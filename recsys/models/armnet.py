"""ARM-Net: CTR prediction by exponential neurons whose exponents sparse attention selects.

Data flow: Features -> dense values squashed into [0.001, 1] -> injected field embedding
(B, F, D) -> sparse gated attention over fields, gates (B, H, K, F) -> exponential neurons
(B, H*K, D) -> batch norm -> flatten -> MLP -> the "ctr" logit. ARM-Net+ (`use_ensemble=True`) adds
a DNN on a second, model-owned embedding and mixes the two logits with a Linear(2 -> 1). The
file holds the config (`ARMNetConfig`), the private gate block and neuron function, and the
model; the registry (`recsys.models.registry`) maps the name "armnet" to both.
"""

from __future__ import annotations

import functools
import math
from typing import Annotated, Literal

import entmax
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys.embeddings import EmbeddingConfig, FieldEmbedding, build_embedding
from recsys.features.batch import Features
from recsys.features.schema import FeatureSchema
from recsys.models.layers import check_ctr_inputs
from recsys.models.outputs import CTRModel, ModelOutput

# The official code clamps every numeric value into [0.001, 1] before the embedding.
DENSE_VALUE_MIN = 1e-3
# BatchNorm squares the neuron outputs: exp(2 * 44) overflows float32, so the exponent clamp
# must stay well below 44.
MAX_EXPONENT_CLAMP = 40.0
# Xavier-uniform gain of the official code for the bilinear weights, queries and values.
XAVIER_GAIN = 1.414


class ARMNetConfig(BaseModel):
    """Hyperparameters of ARM-Net / ARM-Net+ (the registry key is `name`).

    Defaults follow METHODS.md section 2(h) for ML-100K.

    Args:
        name: registry discriminator, always "armnet".
        num_heads: number H of attention heads (each with its own bilinear key projection).
        num_neurons: number K of exponential neurons per head.
        attention_dim: key/query width d_k; None means the embedding width D.
        alpha: entmax alpha of the gates, >= 1; 1 is softmax (dense gates), 2 is sparsemax,
            anything above 1 gives exact zeros.
        mlp_hidden_units: hidden widths of the MLP on the flattened neurons; each >= 1.
        mlp_dropout: dropout rate after each MLP hidden layer, in [0, 1); training only.
        exponent_clamp: upper clamp of every neuron's exponent before exp, in (0, 40].
        grad_clamp: every dense parameter's gradient is clamped to [-grad_clamp, grad_clamp]
            by a hook (the official code clamps to [-1, 1]); None or 0 disables it.
        use_ensemble: ARM-Net+: add a DNN on a separate embedding and mix the two logits.
        dnn_hidden_units: hidden widths of the ARM-Net+ DNN; each >= 1, at least one.
        dnn_dropout: dropout rate after each DNN hidden layer, in [0, 1); training only.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Literal["armnet"] = "armnet"
    num_heads: int = Field(default=1, ge=1)
    num_neurons: int = Field(default=64, ge=1)
    attention_dim: int | None = Field(default=None, ge=1)
    alpha: float = 1.7
    mlp_hidden_units: tuple[Annotated[int, Field(ge=1)], ...] = (256, 256)
    mlp_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    exponent_clamp: float = 30.0
    grad_clamp: float | None = 1.0
    use_ensemble: bool = False
    dnn_hidden_units: tuple[Annotated[int, Field(ge=1)], ...] = (256, 256)
    dnn_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check_ranges(self) -> ARMNetConfig:
        if not (math.isfinite(self.alpha) and self.alpha >= 1.0):
            raise ValueError(
                f"model.armnet: alpha={self.alpha} is not a valid entmax alpha (expected a "
                f"finite value >= 1); use 1 for softmax gates, 1.5-2 for sparse gates"
            )
        if not 0.0 < self.exponent_clamp <= MAX_EXPONENT_CLAMP:
            raise ValueError(
                f"model.armnet: exponent_clamp={self.exponent_clamp} is out of range (expected "
                f"0 < exponent_clamp <= {MAX_EXPONENT_CLAMP}, as batch norm squares exp(...) in "
                f"float32); keep the default 30"
            )
        if self.grad_clamp is not None and not self.grad_clamp >= 0.0:
            raise ValueError(
                f"model.armnet: grad_clamp={self.grad_clamp} is negative (expected a bound > 0, "
                f"or 0/null to disable the gradient clamp)"
            )
        if self.use_ensemble and not self.dnn_hidden_units:
            raise ValueError(
                "model.armnet: use_ensemble=true needs a DNN (got dnn_hidden_units=()); set "
                "dnn_hidden_units, e.g. [256, 256], or use_ensemble=false"
            )
        return self


def _entmax(logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha-entmax over the last axis: softmax at 1, sparsemax at 2, else 50-step bisection."""
    if alpha == 1.0:
        return torch.softmax(logits, dim=-1)
    if alpha == 2.0:
        return entmax.sparsemax(logits, dim=-1)
    return entmax.entmax_bisect(logits, alpha=alpha, dim=-1)


def _exponential_neurons(
    weights: torch.Tensor, emb: torch.Tensor, exponent_clamp: float
) -> torch.Tensor:
    """y_{b,h,k} = exp(min(sum_f w_{b,h,k,f} e_{b,f}, clamp)) = prod_f exp(e_{b,f})^w (clamped).

    Element-wise over D: each neuron is a multiplicative cross feature whose exponents are the
    weights. Shapes: weights (B, H, K, F), emb (B, F, D) -> (B, H, K, D).
    """
    exponent = torch.einsum("bhkf,bfd->bhkd", weights, emb)
    # exp(89) overflows float32; the clamp turns an exploding exponent into a flat gradient
    return torch.exp(exponent.clamp(max=exponent_clamp))


class _SparseGates(nn.Module):
    """Sparse gated attention over fields: which fields, with which exponents, per neuron.

    For head h and neuron k, with keys K_h = E W_h (W_h: D x d_k) and a learned query q_{h,k}:
        a_{b,h,k,f} = <q_{h,k}, K_h[b,f]> / sqrt(d_k)
        g_{b,h,k,:} = entmax_alpha(a_{b,h,k,:})           over the field axis
        w_{b,h,k,f} = g_{b,h,k,f} * v_{h,k,f}             v unconstrained (negative allowed)

    Shapes: (B, F, D) -> (gates (B, H, K, F), weights (B, H, K, F)).

    Args:
        num_fields: F.
        dim: embedding width D.
        config: the model config (heads, neurons, d_k, alpha).
    """

    def __init__(self, num_fields: int, dim: int, config: ARMNetConfig) -> None:
        super().__init__()
        attention_dim = config.attention_dim or dim
        self.alpha = config.alpha
        self.scale = attention_dim**-0.5
        # The official tensor shapes, so xavier_uniform_ sees the same fans as there.
        self.bilinear = nn.Parameter(torch.empty(config.num_heads, dim, attention_dim))
        self.query = nn.Parameter(torch.empty(config.num_heads, config.num_neurons, attention_dim))
        self.value = nn.Parameter(torch.empty(config.num_heads, config.num_neurons, num_fields))
        for param in (self.bilinear, self.query, self.value):
            nn.init.xavier_uniform_(param, gain=XAVIER_GAIN)

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, F, D) -> attention logits (B, H, K, F)."""
        keys = torch.einsum("bfd,hde->bhfe", emb, self.bilinear)  # (B, H, F, d_k)
        return torch.einsum("bhfe,hke->bhkf", keys, self.query) * self.scale

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gates = _entmax(self.logits(emb), self.alpha)  # (B, H, K, F), rows sum to 1
        return gates, gates * self.value


class ARMNet(CTRModel):
    """ARM-Net / ARM-Net+: adaptive relation modeling with exponential neurons.

    Paper: Cai, Zheng, Ooi, Wang, Xiao, Zheng, "ARM-Net: Adaptive Relation Modeling Network
    for Structured Data", SIGMOD 2021, arXiv:2107.01830. Official code: nusdbsystem/ARM-Net.

    Embeddings are read as logarithms of features: a neuron exp(sum_f w_f e_f) = prod_f
    exp(e_f)^w_f is a cross feature of arbitrary, input-dependent order, whose fields and
    exponents the sparse (entmax) attention chooses per row. The H*K neurons are batch-
    normalised, flattened and fed to an MLP. ARM-Net+ (`use_ensemble=True`) adds a DNN on its own
    embedding; Linear(2 -> 1), started at weights 0.5 and bias 0, mixes the two logits.

    Differences from the paper:
        - Follows the official multi-head code (`models/armnet.py`): per-head bilinear keys,
          queries (H, K, d_k), values (H, K, F), Xavier-uniform gain 1.414, BatchNorm over the
          H*K neurons, MLP blocks Linear -> BatchNorm -> ReLU -> Dropout (the ARM-Net+ DNN too).
        - Dense values arrive standardised from the FeatureSchema, while the official code
          expects values in (0, 1] and clamps them to [0.001, 1]; here every dense value is
          mapped x -> sigmoid(x) clamped to [0.001, 1] before both embeddings.
        - The exponent is clamped to <= `exponent_clamp` before exp (METHODS.md, ours), and the
          gates, neurons and their batch norm always run in float32, outside autocast.
        - The gradient clamp (official: every parameter to [-1, 1]) covers every dense
          parameter; the TorchRec tables use a fused optimizer without gradient hooks.
        - The embeddings are injected (PyTorch's EBC init, U(-init_scale, init_scale), instead
          of Xavier); the ARM-Net+ embedding is built here with the same width, init scale and
          device as the injected one and table names prefixed "dnn_".
        - Output is a logit; the sigmoid and the loss live outside forward.

    Shapes: Features with B rows and F = schema.num_fields fields of width D ->
    `ModelOutput(logits={"ctr": (B,)}, extras={"gates": (B, H, K, F)})`.

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
        >>> config = ARMNetConfig(num_heads=2, num_neurons=3, mlp_hidden_units=(8,))
        >>> model = ARMNet(config, build_embedding(schema, EmbeddingConfig(dim=4)), schema)
        >>> output = model.eval()(features_from_rows(schema, [{"user_id": "u1", "item_id": "i9"}]))
        >>> output.logits["ctr"].shape, output.extras["gates"].shape
        (torch.Size([1]), torch.Size([1, 2, 3, 2]))
    """

    def __init__(
        self, config: ARMNetConfig, embedding: FieldEmbedding, schema: FeatureSchema
    ) -> None:
        super().__init__()
        check_ctr_inputs("model.armnet", embedding, schema)
        num_fields = schema.num_fields
        self.config = config
        self.embedding = embedding
        dim = embedding.dim
        num_channels = config.num_heads * config.num_neurons
        self.gates = _SparseGates(num_fields, dim, config)
        self.neuron_norm = nn.BatchNorm1d(num_channels)
        self.mlp = _build_mlp(num_channels * dim, config.mlp_hidden_units, config.mlp_dropout)
        self.dnn_embedding: FieldEmbedding | None = None
        self.dnn: nn.Sequential | None = None
        self.mix: nn.Linear | None = None
        if config.use_ensemble:
            self.dnn_embedding = _build_dnn_embedding(embedding, schema)
            self.dnn = _build_mlp(num_fields * dim, config.dnn_hidden_units, config.dnn_dropout)
            self.mix = nn.Linear(2, 1)
            nn.init.constant_(self.mix.weight, 0.5)
            nn.init.zeros_(self.mix.bias)
        if config.grad_clamp:
            _clamp_dense_gradients(self, config.grad_clamp)

    def forward(self, features: Features) -> ModelOutput:
        features = _squash_dense(features)
        emb = self.embedding(features)  # (B, F, D)
        # exp of float16/bfloat16 overflows far earlier: the ARM block always runs in float32
        with torch.autocast(device_type=emb.device.type, enabled=False):
            gates, weights = self.gates(emb.float())  # (B, H, K, F) each
            neurons = _exponential_neurons(weights, emb.float(), self.config.exponent_clamp)
            neurons = self.neuron_norm(neurons.flatten(1, 2))  # (B, H*K, D)
        logits = self.mlp(neurons.flatten(start_dim=1)).squeeze(-1)  # (B, H*K*D) -> (B,)
        if self.dnn_embedding is not None and self.dnn is not None and self.mix is not None:
            dnn_emb = self.dnn_embedding(features)  # (B, F, D), its own tables
            dnn_logits = self.dnn(dnn_emb.flatten(start_dim=1)).squeeze(-1)  # (B,)
            logits = self.mix(torch.stack([logits, dnn_logits], dim=-1)).squeeze(-1)
        return ModelOutput(logits={"ctr": logits}, extras={"gates": gates})


def _squash_dense(features: Features) -> Features:
    """Standardised dense values -> sigmoid(x) clamped to [0.001, 1], the official range."""
    dense = torch.sigmoid(features.dense).clamp(min=DENSE_VALUE_MIN, max=1.0)
    return Features(sparse=features.sparse, dense=dense, domain=features.domain)


def _build_mlp(in_dim: int, hidden_units: tuple[int, ...], dropout: float) -> nn.Sequential:
    """The official MLP: [Linear -> BatchNorm1d -> ReLU -> Dropout] per width, then Linear -> 1."""
    blocks: list[nn.Module] = []
    for width in hidden_units:
        blocks += [nn.Linear(in_dim, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = width
    blocks.append(nn.Linear(in_dim, 1))
    return nn.Sequential(*blocks)


def _build_dnn_embedding(embedding: FieldEmbedding, schema: FeatureSchema) -> FieldEmbedding:
    """ARM-Net+'s own embedding, like the injected one: same width, init bounds and device
    ('meta' in the trainer, where DMP shards and initialises it), tables prefixed "dnn_"."""
    tables = [m for m in embedding.modules() if isinstance(m, EmbeddingBagCollection)]
    configs = [c for ebc in tables for c in ebc.embedding_bag_configs()]
    init_max = configs[0].weight_init_max if configs else None
    init_scale = init_max if init_max is not None else EmbeddingConfig().init_scale
    params = [p for ebc in tables for p in ebc.parameters()]
    device = params[0].device if params else None
    config = EmbeddingConfig(dim=embedding.dim, init_scale=init_scale)
    return build_embedding(schema, config, device=device, table_prefix="dnn_")


def _clamp_gradient(grad: torch.Tensor, bound: float) -> torch.Tensor:
    return grad.clamp(-bound, bound)


def _clamp_dense_gradients(model: nn.Module, bound: float) -> None:
    """Clamps the gradient of every parameter outside an EmbeddingBagCollection to
    [-bound, bound] as it is computed (before DDP's all-reduce and the optimizer)."""
    table_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, EmbeddingBagCollection)
        for p in m.parameters()
    }
    for param in model.parameters():
        if param.requires_grad and id(param) not in table_ids:
            # a partial, not a lambda, so the model stays picklable
            param.register_hook(functools.partial(_clamp_gradient, bound=bound))
