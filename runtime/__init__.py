"""clipedge: jina-clip-v2 embeddings with onnxruntime or TensorRT, without PyTorch."""

__version__ = "0.1.0"
