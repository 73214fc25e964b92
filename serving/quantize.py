"""Row-wise int8/int4 embedding tables for serving (`recsys serve --quantize int8`).

The model manager applies `quantize_tables` to a model right after `load_artifact` (through
`quantize_transform`), before warm-up. Every TorchRec `EmbeddingBagCollection` in the model is
swapped for TorchRec's inference `QuantEmbeddingBagCollection`, whose lookups run in fbgemm's
`IntNBitTableBatchedEmbeddingBagsCodegen` kernels (CPU here, CUDA where fbgemm-gpu is built for
it). Everything else (attention layers, MLPs, the dense-feature vectors) stays fp32, and
`forward(features)`, `probabilities()` and the `(B, F, D)` field embeddings are unchanged.

What is stored: each table row is quantized on its own (row-wise, asymmetric): the row's fp16
scale and fp16 bias (4 bytes, at the front of the row in fbgemm's CPU layout), then `D` codes of
8 (int8) or 4 (int4, two per byte) bits, so a value is `code * scale + bias`. The tables stay
quantized at rest: the served module holds one uint8 buffer per group of tables (`weights_host`
of each fbgemm module; the per-table `embedding_bags.<table>.weight` buffers are uint8 views
into it), dequantization happens inside the pooled lookup (SUM or MEAN, as trained), and no
fp32 copy of a table is kept.

Why the bytes are not simply a quarter of fp32: TorchRec pads every quantized row to a multiple
of `row_alignment` = 16 bytes (its default; fbgemm's CUDA kernels read rows in 16-byte vectors),
and fbgemm starts every table on a 128-byte cache line. An int8 row of D=16 is 16 + 4 = 20
bytes, padded to 32: 0.50 of fp32's 64 bytes (0.375 at D=32, 0.31 at D=64, 0.28 at D=128); an
int4 row of D=16 is 8 + 4 = 12, padded to 16: 0.25. fbgemm's CPU kernels also accept
`row_alignment=1` (no padding: 20 bytes, 0.31 of fp32 at D=16); the default stays TorchRec's 16,
which DESIGN.md's figures assume and CUDA hosts need. fbgemm's quantizer keeps the fp16 scale and
bias 2-byte aligned, so a row's codes must fill an even number of bytes: D must be a multiple of
2 for int8 and of 4 for int4.

`embedding_bytes` measures the served table tensors (`nbytes` of the uint8 storage, scale and
bias included, since they live inside each row); `fp32_embedding_bytes` is what the same tables
take in fp32, so their ratio is the memory saving the server reports.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from functools import partial
from typing import Literal, get_args

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
    IntNBitTableBatchedEmbeddingBagsCodegen,
)
from torch import nn
from torch.ao.quantization import PlaceholderObserver
from torchrec.modules.embedding_configs import QuantConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import (
    DEFAULT_ROW_ALIGNMENT,
    MODULE_ATTR_REGISTER_TBES_BOOL,
    MODULE_ATTR_ROW_ALIGNMENT_INT,
)
from torchrec.quant.embedding_modules import (
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)

from recsys.errors import ConfigError
from recsys.models.outputs import CTRModel

logger = logging.getLogger(__name__)

QuantDtype = Literal["int8", "int4"]

# torch.quint4x2 is how TorchRec names fbgemm's INT4 sparse type.
_TORCH_DTYPES: dict[str, torch.dtype] = {"int8": torch.int8, "int4": torch.quint4x2}
_BITS: dict[str, int] = {"int8": 8, "int4": 4}
_FP32_BYTES = 4


def _check_dtype(dtype: str) -> None:
    if dtype not in _TORCH_DTYPES:
        raise ConfigError(
            f"quantize: unknown table dtype {dtype!r} "
            f"(expected one of {list(get_args(QuantDtype))})"
        )


def _check_dims(ebc: EmbeddingBagCollection, module_name: str, dtype: str) -> None:
    """Every table's packed codes must fill an even number of bytes (fbgemm's fp16 alignment)."""
    multiple = 16 // _BITS[dtype]
    for table in ebc.embedding_bag_configs():
        if table.embedding_dim % multiple:
            fix = "serve it unquantized"
            if dtype == "int4" and table.embedding_dim % 2 == 0:
                fix += " or with int8"
            raise ConfigError(
                f"quantize: table '{table.name}' in '{module_name}' has embedding_dim "
                f"{table.embedding_dim}, which fbgemm cannot store as {dtype} (expected a "
                f"multiple of {multiple}: each row's codes must fill an even number of bytes so "
                f"its fp16 scale and bias stay aligned); {fix}"
            )


def _is_fp32_collection(module: nn.Module) -> bool:
    # exact type: the quantized collection is not a subclass, and a subclass may change lookups
    return type(module) is EmbeddingBagCollection


def _quantize_collection(
    ebc: EmbeddingBagCollection, dtype: str, row_alignment: int
) -> QuantEmbeddingBagCollection:
    ebc.qconfig = QuantConfig(
        activation=PlaceholderObserver.with_args(dtype=torch.float),
        weight=PlaceholderObserver.with_args(dtype=_TORCH_DTYPES[dtype]),
    )
    # Registered TBEs make the fbgemm modules (and their uint8 storage) ordinary submodules, so
    # `.to()`, `modules()` and `embedding_bytes` see them. The features-order cache that
    # `quantize_inference_model` turns on is left off: it registers a buffer during the first
    # forward, a mutation that would race between the batcher's threads.
    setattr(ebc, MODULE_ATTR_REGISTER_TBES_BOOL, True)
    setattr(ebc, MODULE_ATTR_ROW_ALIGNMENT_INT, row_alignment)
    quantized = QuantEmbeddingBagCollection.from_float(ebc)
    # from_float keeps the unpadded uint8 rows it copied into fbgemm's storage (only __init__
    # reads them); dropping them leaves exactly one uint8 copy of each table.
    quantized._table_name_to_quantized_weights = None
    return quantized


def quantize_tables(
    model: CTRModel,
    dtype: QuantDtype,
    *,
    inplace: bool = False,
    row_alignment: int = DEFAULT_ROW_ALIGNMENT,
) -> CTRModel:
    """Swaps every EmbeddingBagCollection of `model` for row-wise quantized tables.

    Args:
        model: a model with full (unsharded) fp32 TorchRec tables, e.g. `load_artifact(p).model`.
        dtype: "int8" (8-bit codes) or "int4" (4-bit codes, two per byte); both on CPU.
        inplace: quantize `model` itself instead of a deep copy. The model manager quantizes a
            freshly loaded model in place, so the fp32 tables are freed one collection at a
            time instead of the whole fp32 model being held twice.
        row_alignment: bytes each quantized row is padded to; TorchRec's default 16 works on
            CPU and GPU, fbgemm's CPU kernels also accept 1 (no padding). Must be >= 1.

    Returns:
        The quantized model in eval mode (`model` itself when `inplace`), with the same
        `forward(features)` and `probabilities()`.

    Raises:
        ConfigError: an unknown dtype, a row_alignment below 1, no EmbeddingBagCollection to
            quantize (e.g. the model is quantized already), or a table whose embedding_dim the
            dtype cannot pack.
    """
    _check_dtype(dtype)
    if row_alignment < 1:
        raise ConfigError(f"quantize: row_alignment must be >= 1 (got {row_alignment})")
    names = [name for name, module in model.named_modules() if _is_fp32_collection(module)]
    if not names:
        raise ConfigError(
            f"quantize: {type(model).__name__} has no fp32 EmbeddingBagCollection to quantize "
            f"(got modules {sorted({type(m).__name__ for m in model.modules()})}); was it "
            f"quantized already?"
        )
    for name in names:
        _check_dims(model.get_submodule(name), name, dtype)  # before any table is swapped
    fp32_bytes = fp32_embedding_bytes(model)
    if not inplace:
        model = copy.deepcopy(model)
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        quantized = _quantize_collection(getattr(parent, child_name), dtype, row_alignment)
        setattr(parent, child_name, quantized)  # drops the last reference to this fp32 copy
    model.eval()
    served_bytes = embedding_bytes(model)
    logger.info(
        "quantized %d embedding collection(s) to %s: %d -> %d table bytes (%.3f of fp32)",
        len(names),
        dtype,
        fp32_bytes,
        served_bytes,
        served_bytes / max(fp32_bytes, 1),
    )
    return model


def quantize_transform(dtype: QuantDtype) -> Callable[[CTRModel], CTRModel]:
    """The model manager's `transform` for `--quantize dtype`: quantizes a loaded model in place.

    Args:
        dtype: "int8" or "int4", as for `quantize_tables`.
    """
    _check_dtype(dtype)
    return partial(quantize_tables, dtype=dtype, inplace=True)


def embedding_bytes(model: nn.Module) -> int:
    """Bytes of the table storage `model` actually serves from.

    Quantized tables count the uint8 storage of each fbgemm module (codes, per-row scale and
    bias, row and cache-line padding); fp32 EmbeddingBagCollections count their weights. Each
    storage is counted once.

    Args:
        model: any module; a model without tables gives 0.
    """
    storages: dict[tuple[torch.device, int], int] = {}
    for module in model.modules():
        if isinstance(module, IntNBitTableBatchedEmbeddingBagsCodegen):
            tensors = [
                module.weights_host,
                module.weights_dev,
                module.weights_uvm,
                module.lxu_cache_weights,
            ]
        elif _is_fp32_collection(module):
            tensors = list(module.parameters())
        else:
            continue
        for tensor in tensors:
            if tensor.numel():
                storage = tensor.untyped_storage()
                storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def fp32_embedding_bytes(model: nn.Module) -> int:
    """Bytes the model's tables take in fp32 (rows x D x 4), quantized or not.

    Args:
        model: any module; fp32 and quantized EmbeddingBagCollections are both counted.
    """
    total = 0
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection | QuantEmbeddingBagCollection):
            for table in module.embedding_bag_configs():
                total += table.num_embeddings * table.embedding_dim * _FP32_BYTES
    return total
