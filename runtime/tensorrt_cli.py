"""The `build-engine` and `verify` subcommands (handlers import their modules lazily)."""

from __future__ import annotations

import argparse


def _build_engine(args: argparse.Namespace) -> int:
    from pathlib import Path

    from clipedge.bundle.manifest import read_manifest
    from clipedge.engine.tensorrt_build import BuildOptions, build_engines

    options = BuildOptions(
        precision=args.precision,
        profiles=args.profiles,
        version_compatible=args.version_compatible,
        timing_cache=Path(args.timing_cache) if args.timing_cache else None,
        workspace_gb=args.workspace_gb,
        optimization_level=args.optimization_level,
        flavour=args.flavour,
        compute_capabilities=[c for c in (args.compute_capability or "").split(",") if c],
        keep_graph=args.keep_graph,
    )
    towers = [args.tower] if args.tower else None
    if args.ep_context:
        from clipedge.engine.tensorrt_build import build_ep_context

        for tower in towers or read_manifest(args.bundle).towers:
            build_ep_context(args.bundle, tower, args.precision, args.profiles)
        return 0
    build_engines(args.bundle, towers, options)
    return 0


def _verify_files(bundle: str) -> int:
    """Re-hash every file against the manifest (refreshing the load stamp) and check every
    ONNX graph's inputs and outputs against it; a mismatch is a BundleError (exit 1)."""
    import time
    from pathlib import Path

    from clipedge.bundle.checks import check_graph
    from clipedge.bundle.files import check_files
    from clipedge.bundle.manifest import read_manifest

    started = time.perf_counter()
    manifest = read_manifest(bundle)
    hashed = check_files(Path(bundle), manifest, verify_checksums=True)
    size = sum(manifest.files[name]["bytes"] for name in hashed)
    seconds = time.perf_counter() - started
    graphs = [
        (name, Path(bundle) / graph.file)
        for name, tower in manifest.towers.items()
        for graph in tower.graphs.values()
    ]
    for name, graph in graphs:
        check_graph(manifest, name, graph)
    print(
        f"{bundle}: {len(hashed)} files ({size / 1e6:.1f} MB) match their sha256 "
        f"({seconds:.1f} s); the inputs and outputs of {len(graphs)} graphs match the manifest"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from clipedge.verify import verify_bundle

    if args.files:
        return _verify_files(args.bundle)
    results = verify_bundle(args.bundle, batch_size=args.batch_size)
    return 0 if all(r.passed for r in results) else 1


def add_commands(commands: argparse._SubParsersAction) -> None:
    build = commands.add_parser(
        "build-engine",
        help="build native TensorRT engines into a bundle (one tower at a time)",
    )
    build.add_argument("bundle", help="bundle directory")
    build.add_argument("--tower", choices=("text", "vision"), help="default: every tower")
    build.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp16")
    build.add_argument(
        "--profiles",
        help="text: BATCHxLENGTH buckets, e.g. 32x128,32x512,8x2048,2x8192 (default "
        "32x128,32x512); vision: max batches, e.g. 1,32 (default 32)",
    )
    build.add_argument(
        "--version-compatible",
        action="store_true",
        help="engine runs on later TensorRT versions of the same major (lean runtime)",
    )
    build.add_argument("--timing-cache", help="timing cache file, read and updated")
    build.add_argument(
        "--workspace-gb", type=float, default=4.0, help="builder workspace limit (default 4)"
    )
    build.add_argument(
        "--optimization-level", type=int, default=3, help="builder optimisation level 0-5"
    )
    build.add_argument(
        "--flavour",
        choices=("tensorrt", "tensorrt_rtx"),
        help="builder to use (default: tensorrt if installed, else tensorrt_rtx)",
    )
    build.add_argument(
        "--compute-capability",
        help="TensorRT for RTX targets, e.g. 8.9,12.0 (default: its portable set)",
    )
    build.add_argument(
        "--keep-graph",
        action="store_true",
        help="keep the TensorRT-only int8 copy (<graph>.trt.onnx) for trtexec / polygraphy",
    )
    build.add_argument(
        "--ep-context",
        action="store_true",
        help="instead: build with onnxruntime's TensorRT provider and write its EPContext "
        "graph (ahead-of-time engines for that provider; needs a GPU)",
    )
    build.set_defaults(handler=_build_engine)

    verify = commands.add_parser(
        "verify",
        help="every engine / precision this machine runs vs the fp32 graph, and batch invariance",
    )
    verify.add_argument("bundle", help="bundle directory")
    verify.add_argument("--batch-size", type=int, default=8, help="the full batch (default 8)")
    verify.add_argument(
        "--files",
        action="store_true",
        help="instead: re-hash every file against the manifest (and renew the stamp that "
        "spares later loads the hashing) and check each graph's inputs and outputs",
    )
    verify.set_defaults(handler=_verify)
