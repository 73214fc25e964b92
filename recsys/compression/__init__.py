"""Low-rank compression of trained models (METHODS.md §8): factorised layers and the
activation-PCA procedure.

Only the torch-level building blocks are exported here: `recsys.artifact` imports them to
rebuild a compressed model, and the procedure (`recsys.compression.lowrank`) imports the
artifact's layers in turn, so it is imported by its full name.
"""

from recsys.compression.factorized import (
    FactorizedLayerSpec,
    FactorizedLinear,
    apply_compression,
    factorize_modules,
)

__all__ = ["FactorizedLayerSpec", "FactorizedLinear", "apply_compression", "factorize_modules"]
