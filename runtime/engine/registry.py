"""The backends by name: what each runs on, its options dataclass and how to open a session.

Adding a backend is one module with a session class (see `session.TowerSession`) and an
options dataclass, plus one `register(...)` line here. Session modules import their heavy
libraries lazily, so this table costs nothing at `import clipedge`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bundle.manifest import TowerManifest
from ..errors import OptionError, OptionTypeError
from . import onnxruntime_backend, openvino_backend, tensorrt_backend
from .session import TowerSession


@dataclass(frozen=True)
class Backend:
    """One backend.

    `device` is the precision preference class its graphs are chosen for ("cpu", "gpu" or
    "openvino", see `plan.PREFERENCE`); `fallback` is the backend used, with a warning, when
    this one is asked for by name but not available (None: an error instead).
    """

    name: str
    device: str
    options_type: type
    open: Callable[[Path, TowerManifest, Any, bool], TowerSession]
    available: Callable[[], bool]
    fallback: str | None = None
    install_hint: str | None = None

    def checked_options(self, options: Any, threads: int | None = None) -> Any:
        """The caller's options for this backend (defaults when None), `threads` applied; an
        `OptionTypeError` naming both when they are another backend's, or naming the field
        whose value has the wrong type."""
        if options is None:
            options = self.options_type()
        elif not isinstance(options, self.options_type):
            raise OptionTypeError(
                f"backend {self.name!r} takes {self.options_type.__name__}, "
                f"got {type(options).__name__}"
            )
        check_field_types(options)
        return options if threads is None else dataclasses.replace(options, threads=threads)


# Annotation words -> the runtime types they accept (bool is no int here, an int is a float).
TYPE_WORDS: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
    "Path": (str, os.PathLike),
    "dict": (dict,),
    "None": (type(None),),
}
# Fields that count something: at least this much.
MINIMUMS = {"threads": 1, "device": 0, "max_contexts": 1, "workspace_gb": 0}


def check_field_types(options: Any) -> None:
    """Every field of a backend's options dataclass against its annotation (`int | None`,
    `dict[...]`, `Path | None`, ...; other types are left to the dataclass) and, for the
    counting fields, its minimum: an `OptionError` naming the field and what it takes."""
    for item in dataclasses.fields(options):
        words = [word.strip().split("[")[0] for word in str(item.type).split("|")]
        if not all(word in TYPE_WORDS for word in words):
            continue
        value = getattr(options, item.name)
        allowed = tuple(t for word in words for t in TYPE_WORDS[word])
        wrong_bool = isinstance(value, bool) and "bool" not in words
        name = f"{type(options).__name__}.{item.name}"
        if wrong_bool or not isinstance(value, allowed):
            raise OptionTypeError(
                f"{name} must be {' or '.join(words)}, got {type(value).__name__} {value!r}"
            )
        minimum = MINIMUMS.get(item.name)
        if minimum is not None and isinstance(value, int | float) and value < minimum:
            raise OptionError(f"{name} must be >= {minimum}, got {value!r}")


BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    BACKENDS[backend.name] = backend


def backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise OptionError(f"unknown backend {name!r}; choose one of {('auto', *BACKENDS)}")
    return BACKENDS[name]


def _onnxruntime(name: str) -> Callable[[Path, TowerManifest, Any, bool], TowerSession]:
    def open_session(graph: Path, tower: TowerManifest, options: Any, quiet: bool):
        return onnxruntime_backend.OrtSession(graph, name, options, tower, not quiet)

    return open_session


def _openvino(graph: Path, tower: TowerManifest, options: Any, quiet: bool) -> TowerSession:
    return openvino_backend.OpenVinoSession(graph, options)


register(
    Backend(
        "cpu",
        "cpu",
        onnxruntime_backend.OnnxruntimeOptions,
        _onnxruntime("cpu"),
        lambda: True,
    )
)
register(
    Backend(
        "cuda",
        "gpu",
        onnxruntime_backend.OnnxruntimeOptions,
        _onnxruntime("cuda"),
        functools.partial(onnxruntime_backend.provider_available, "cuda"),
        fallback="cpu",
    )
)
# Native engines built into the bundle (clipedge build-engine); else onnxruntime's TensorRT.
register(
    Backend(
        "tensorrt-native",
        "gpu",
        tensorrt_backend.TensorrtOptions,
        tensorrt_backend.open_session,
        tensorrt_backend.available,
        fallback="tensorrt",
    )
)
register(
    Backend(
        "tensorrt",
        "gpu",
        onnxruntime_backend.TensorrtEpOptions,
        _onnxruntime("tensorrt"),
        functools.partial(onnxruntime_backend.provider_available, "tensorrt"),
        fallback="cuda",
    )
)
register(
    Backend(
        "openvino",
        "openvino",
        openvino_backend.OpenVinoOptions,
        _openvino,
        openvino_backend.openvino_installed,
        install_hint=openvino_backend.INSTALL_HINT,
    )
)
