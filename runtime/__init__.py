"""clipedge: jina-clip-v2 embeddings with onnxruntime, OpenVINO or TensorRT, without PyTorch."""

__version__ = "0.1.0"

from .bundle.manifest import BundleError  # noqa: E402
from .engine.onnxruntime_backend import OnnxruntimeOptions, TensorrtEpOptions  # noqa: E402
from .engine.openvino_backend import OpenVinoOptions  # noqa: E402
from .engine.profiles import ProfileLimits  # noqa: E402
from .inputs.errors import InputError, TextInputError  # noqa: E402
from .inputs.images import ImageInputError  # noqa: E402
from .model import ClipEdgeModel, load  # noqa: E402
from .stages import NonFiniteEmbeddingError  # noqa: E402

__all__ = [
    "BundleError",
    "ClipEdgeModel",
    "ImageInputError",
    "InputError",
    "NonFiniteEmbeddingError",
    "OnnxruntimeOptions",
    "OpenVinoOptions",
    "ProfileLimits",
    "TensorrtEpOptions",
    "TextInputError",
    "__version__",
    "load",
]
