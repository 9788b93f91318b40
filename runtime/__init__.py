"""clipedge: jina-clip-v2 embeddings with onnxruntime or TensorRT, without PyTorch."""

__version__ = "0.1.0"

from .bundle.manifest import BundleError  # noqa: E402
from .inputs.images import ImageInputError  # noqa: E402
from .model import ClipEdgeModel, load  # noqa: E402

__all__ = ["BundleError", "ClipEdgeModel", "ImageInputError", "__version__", "load"]
