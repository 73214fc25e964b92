"""recsys: the library shared by the trainer and the server.

Data -> features (KeyedJaggedTensor) -> embeddings -> models -> metrics, and the artifact that
carries a trained model from training to serving. Imports neither Ray nor gRPC.
"""

__version__ = "0.1.0"
