"""ESMM: post-click conversion rate (CVR) trained over the entire impression space.

Data flow: Features -> injected field embedding (B, F, D) -> flatten (B, F*D) -> two towers of
identical structure -> the "ctr" logit a and the "cvr" logit b. `probabilities` serves
pCTR = sigmoid(a), pCVR = sigmoid(b) and pCTCVR = pCTR * pCVR; `ESMM.loss` is the entire-space
objective on the labels "ctr" (click) and "ctcvr" (click AND conversion). The file holds the
config (`ESMMConfig`), the model and its loss; the registry maps the name "esmm" to both.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.nn import functional as F

from recsys.embeddings.per_feature import FieldEmbedding
from recsys.errors import ConfigError
from recsys.features.batch import Features
from recsys.features.schema import FeatureSchema
from recsys.models.layers import build_mlp
from recsys.models.outputs import CTRModel, ModelOutput

_LOG_2 = math.log(2.0)


class ESMMConfig(BaseModel):
    """Hyperparameters of ESMM (the registry key is `name`).

    Args:
        name: registry discriminator, always "esmm".
        tower_hidden_units: hidden widths shared by the CTR and the CVR tower (each >= 1);
            empty means linear towers. (128, 64) is our ml100k-esmm default (METHODS.md 3(h)).
        tower_dropout: dropout rate after each tower hidden layer, in [0, 1); training only.
        objective: "entire_space" is the paper's loss, BCE(click, pCTR) + BCE(ctcvr, pCTCVR)
            over all impressions. "clicked_only" is the paper's naive CVR baseline: the CVR
            tower and the embedding learn BCE(conversion, pCVR) on clicked rows only, and the
            CTR tower learns BCE(click, pCTR) on all rows from the detached embedding.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Literal["esmm"] = "esmm"
    tower_hidden_units: tuple[int, ...] = (128, 64)
    tower_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    objective: Literal["entire_space", "clicked_only"] = "entire_space"

    @field_validator("tower_hidden_units")
    @classmethod
    def _positive_widths(cls, widths: tuple[int, ...]) -> tuple[int, ...]:
        if any(width < 1 for width in widths):
            raise ValueError(
                f"model.esmm: tower_hidden_units must hold widths >= 1 (got {widths}); "
                f"drop the non-positive entries, e.g. tower_hidden_units=(128, 64)"
            )
        return widths


class ESMM(CTRModel):
    """ESMM: a CTR tower and a CVR tower on one shared embedding, CVR learned via CTCVR.

    Paper: Ma et al., "Entire Space Multi-Task Model: An Effective Approach for Estimating
    Post-Click Conversion Rate", SIGIR 2018, arXiv:1804.07931.

    A CVR model trained on clicked impressions only is biased (it is served on all impressions)
    and starved of data. ESMM never fits pCVR directly: with pCTR = P(click | x) and
    pCVR = P(conversion | click, x), the identity P(click, conversion | x) = pCTR * pCVR lets it
    fit pCTR to the click label and pCTR * pCVR to the ctcvr label (click AND conversion), both
    over every impression, so both towers see every impression and pCVR is learned implicitly.
    The embedding is shared by both towers; it carries what the plentiful click signal teaches
    to the CVR tower.

    Loss ("entire_space"), mean over the B impressions of the batch:
        L = mean BCE(click, sigmoid(a)) + mean BCE(ctcvr, sigmoid(a) * sigmoid(b))
    with log pCTCVR = -softplus(-a) - softplus(-b) and log(1 - pCTCVR) = log1mexp(-log pCTCVR),
    so the loss stays finite and exact for saturated logits (no probability clamping).

    "clicked_only" (the paper's BASE-style naive CVR, as a config for comparisons):
        L = mean_all BCE(click, sigmoid(a')) + mean_{click=1} BCE(ctcvr, sigmoid(b))
    where a' is the CTR tower run on the detached embedding. On clicked rows ctcvr equals the
    conversion label, so the CVR tower and the embedding learn only from clicked rows, while the
    CTR tower still trains and the served pCTR and pCTCVR stay meaningful. A batch without
    clicks gives a CVR term of exactly 0 that is still part of the graph.

    Differences from the paper:
        - Losses are means per impression (the paper sums); the two terms have equal weight.
        - The towers share one structure, [Linear -> ReLU -> Dropout] per width then
          Linear -> 1, default (128, 64) instead of the paper's 360 -> 200 -> 80 -> 2 (a
          softmax over two units); one logit per tower is the same model.
        - The embedding is injected (the per-feature embedding: multi-hot fields MEAN-pooled
          where the paper sum-pools behaviour fields; dense fields `v_f * x_f`); no L2 term.
        - pCVR is exposed as a served task (DeepCTR's ESMM returns only pCTR and pCTCVR).
        - "clicked_only" is ours: a naive-CVR baseline in the same code path. Its CTR tower on a
          detached embedding departs from the paper's BASE model, which trains separate models.

    Shapes: Features with B rows and F = schema.num_fields fields of width D ->
    `ModelOutput(logits={"ctr": (B,), "cvr": (B,)})`; `probabilities` adds "ctcvr" (B,).

    Args:
        config: the model hyperparameters (tower widths, dropout, objective).
        embedding: the shared field embedding, built outside so the trainer can shard it; must
            give schema.num_fields fields of width `embedding.dim`.
        schema: the fitted feature schema; its labels must train the tasks "ctr" (click) and
            "ctcvr" (click AND conversion, defined on every impression).

    Raises:
        ConfigError: the embedding's field count differs from the schema's, or the schema lacks
            the task "ctr" or "ctcvr".

    Example:
        >>> import pyarrow as pa
        >>> from recsys.data.schema import DatasetSchema
        >>> from recsys.embeddings import EmbeddingConfig, build_embedding
        >>> from recsys.features.batch import features_from_rows
        >>> from recsys.features.schema import fit_feature_schema
        >>> dataset = DatasetSchema.model_validate({"name": "toy", "columns": [
        ...     {"name": "user_id", "role": "categorical"},
        ...     {"name": "item_id", "role": "categorical"},
        ...     {"name": "click", "role": "label", "task": "ctr"},
        ...     {"name": "ctcvr", "role": "label"}]})
        >>> rows = pa.table({"user_id": ["u1", "u2"], "item_id": ["i1", "i2"],
        ...                  "click": [1, 0], "ctcvr": [1, 0]})
        >>> schema = fit_feature_schema(dataset, [rows])
        >>> config = ESMMConfig(tower_hidden_units=(8, 4))
        >>> model = ESMM(config, build_embedding(schema, EmbeddingConfig(dim=4)), schema)
        >>> output = model(features_from_rows(schema, [{"user_id": "u1", "item_id": "i9"}]))
        >>> probs = model.probabilities(output)
        >>> sorted(output.logits), sorted(probs), probs["ctcvr"].shape
        (['ctr', 'cvr'], ['ctcvr', 'ctr', 'cvr'], torch.Size([1]))
        >>> bool(probs["ctcvr"] <= probs["ctr"])
        True
    """

    trained_tasks = ("ctr", "cvr")

    def __init__(
        self, config: ESMMConfig, embedding: FieldEmbedding, schema: FeatureSchema
    ) -> None:
        super().__init__()
        num_fields = schema.num_fields
        if embedding.num_fields != num_fields:
            raise ConfigError(
                f"model.esmm: the embedding gives {embedding.num_fields} fields (expected "
                f"{num_fields}, the schema's sparse + dense features); build it from this schema"
            )
        missing = [task for task in ("ctr", "ctcvr") if task not in schema.tasks]
        if missing:
            raise ConfigError(
                f"model.esmm: trains the tasks 'ctr' and 'ctcvr' (got schema tasks "
                f"{list(schema.tasks)}, missing {missing}); set `task: ctr` on the click label "
                f"and `task: ctcvr` on a label that is click AND conversion on every impression"
            )
        self.config = config
        self.embedding = embedding
        in_dim = num_fields * embedding.dim
        # Two towers of one structure: [Linear -> ReLU -> Dropout] per width, then Linear -> 1.
        self.ctr_tower = build_mlp(in_dim, config.tower_hidden_units, config.tower_dropout, 1)
        self.cvr_tower = build_mlp(in_dim, config.tower_hidden_units, config.tower_dropout, 1)

    @property
    def served_tasks(self) -> tuple[str, ...]:
        return ("ctr", "cvr", "ctcvr")

    def forward(self, features: Features) -> ModelOutput:
        emb = self.embedding(features).flatten(start_dim=1)  # (B, F, D) -> (B, F*D)
        # clicked_only: no impression-level (click) gradient may reach the shared embedding.
        ctr_input = emb.detach() if self.config.objective == "clicked_only" else emb
        ctr_logits = self.ctr_tower(ctr_input).squeeze(-1)  # (B,)
        cvr_logits = self.cvr_tower(emb).squeeze(-1)  # (B,)
        return ModelOutput(logits={"ctr": ctr_logits, "cvr": cvr_logits})

    def probabilities(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        """pCTR, pCVR and pCTCVR = pCTR * pCVR (a product of probabilities, never of logits)."""
        ctr_prob = torch.sigmoid(output.logits["ctr"])
        cvr_prob = torch.sigmoid(output.logits["cvr"])
        return {"ctr": ctr_prob, "cvr": cvr_prob, "ctcvr": ctr_prob * cvr_prob}

    def loss(self, output: ModelOutput, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        """The configured objective (see the class docstring) on labels "ctr" and "ctcvr".

        Never a direct loss on pCVR over all impressions: under "entire_space" the CVR tower is
        supervised only through pCTCVR.
        """
        ctr_logits, cvr_logits = output.logits["ctr"], output.logits["cvr"]
        click, ctcvr = labels["ctr"], labels["ctcvr"]
        ctr_loss = F.binary_cross_entropy_with_logits(ctr_logits, click)
        if self.config.objective == "clicked_only":
            clicked = (click > 0.5).to(cvr_logits.dtype)
            per_row = F.binary_cross_entropy_with_logits(cvr_logits, ctcvr, reduction="none")
            # sum / max(count, 1): exactly 0 for a batch without clicks, yet still in the graph.
            cvr_loss = (per_row * clicked).sum() / clicked.sum().clamp(min=1.0)
            return ctr_loss + cvr_loss
        return ctr_loss + ctcvr_bce_with_logits(ctr_logits, cvr_logits, ctcvr)


def ctcvr_bce_with_logits(
    ctr_logits: torch.Tensor, cvr_logits: torch.Tensor, ctcvr: torch.Tensor
) -> torch.Tensor:
    """Mean BCE(ctcvr, sigmoid(a) * sigmoid(b)) computed from the logits a, b, stably.

    log p = log sigmoid(a) + log sigmoid(b) = -(softplus(-a) + softplus(-b)), and
    log(1 - p) = log1mexp(-log p); neither goes through p, so saturated logits (p rounding to
    0 or 1 in float32) still give the exact, finite loss and gradient.
    """
    neg_log_prob = F.softplus(-ctr_logits) + F.softplus(-cvr_logits)  # -log p >= 0, (B,)
    log_one_minus_prob = _log1mexp(neg_log_prob)  # log(1 - p), (B,)
    return -(ctcvr * -neg_log_prob + (1.0 - ctcvr) * log_one_minus_prob).mean()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(-x)) for x >= 0 (Maechler 2012): expm1 near 0, log1p further out.

    Each branch gets an input clamped to its own range, so the branch torch.where discards
    cannot put inf * 0 = NaN into the gradient; x = 0 (p = 1) is treated as the smallest
    positive float, giving a large but finite log(1 - p).
    """
    tiny = torch.finfo(x.dtype).tiny
    near_zero = x.clamp(min=tiny, max=_LOG_2)
    far = x.clamp(min=_LOG_2)
    return torch.where(
        x < _LOG_2, torch.log(-torch.expm1(-near_zero)), torch.log1p(-torch.exp(-far))
    )
