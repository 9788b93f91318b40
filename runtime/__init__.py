"""clipedge: jina-clip-v2 embeddings with onnxruntime, OpenVINO or TensorRT, without PyTorch."""

__version__ = "0.1.0"

from .engine.onnxruntime_backend import OnnxruntimeOptions, TensorrtEpOptions  # noqa: E402
from .engine.openvino_backend import OpenVinoOptions  # noqa: E402
from .engine.profiles import ProfileLimits  # noqa: E402
from .errors import (  # noqa: E402
    BackendError,
    BundleError,
    ClipEdgeError,
    EngineLimitError,
    ImageInputError,
    InputError,
    NonFiniteEmbeddingError,
    OptionError,
    OptionTypeError,
    SourceError,
    TextInputError,
)
from .model import ClipEdgeModel, load  # noqa: E402
from .options import Options  # noqa: E402

__all__ = [
    "BackendError",
    "BundleError",
    "ClipEdgeError",
    "ClipEdgeModel",
    "EngineLimitError",
    "ImageInputError",
    "InputError",
    "NonFiniteEmbeddingError",
    "OnnxruntimeOptions",
    "OpenVinoOptions",
    "Options",
    "OptionError",
    "OptionTypeError",
    "ProfileLimits",
    "SourceError",
    "TensorrtEpOptions",
    "TextInputError",
    "__version__",
    "load",
]
