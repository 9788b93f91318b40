"""The `embed` command (needs the `batch` extra: pyarrow)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from clipedge.errors import OptionError
from clipedge.options import Options, add_arguments, from_arguments


def embed_command(args: argparse.Namespace) -> int:
    from .job import EmbedJob, embed

    if bool(args.images) == bool(args.texts):
        raise OptionError("give exactly one of --images or --texts")
    job = EmbedJob(
        bundle=Path(args.bundle),
        source=args.images or args.texts,
        kind="images" if args.images else "texts",
        out_dir=Path(args.output),
        dimensions=args.dimensions,
        task=args.task,
        batch_size=args.batch_size,
        workers=args.workers,
        shard_size=args.shard_size,
        dtype=args.dtype,
        fail_fast=args.fail_fast,
        column=args.column,
        id_column=args.id_column,
        keep=tuple(c for c in (args.keep or "").split(",") if c),
        backend=args.backend,
        precision=args.precision,
        options=from_arguments(args, Options),
        hash=args.hash,
        to=args.to,
    )
    progress = None if sys.stderr.isatty() else False
    if args.ray is None:
        summary = embed(job, progress)
    else:
        from .ray_data import embed_with_ray

        summary = embed_with_ray(job, None if args.ray == "local" else args.ray, progress)
    print(summary.line())
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "embed", help="embed images or texts into resumable Parquet shards (batch extra)"
    )
    parser.add_argument("bundle")
    parser.add_argument("--images", help="folder, glob, list file of paths/URLs, .parquet/.csv")
    parser.add_argument("--texts", help=".txt, .jsonl, .csv or .parquet")
    parser.add_argument("-o", "--output", required=True, help="output folder of shards")
    parser.add_argument("--dimensions", type=int, help="Matryoshka dimensions (default all)")
    parser.add_argument("--task", help="e.g. retrieval.query (texts)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="image decoding processes (0: threads in this process)",
    )
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument(
        "--fail-fast",
        action="store_true",
        help="stop at the first bad input (or unreadable source line) instead of an error row",
    )
    parser.add_argument("--column", help="table column with the text / image path, URL or bytes")
    parser.add_argument("--id-column", help="table column with ids (default: row number)")
    parser.add_argument("--keep", help="comma list of source columns to keep")
    parser.add_argument(
        "--backend",
        default="auto",
        help="auto, cpu, cuda, tensorrt, tensorrt-native or openvino (default auto)",
    )
    parser.add_argument(
        "--precision", help="a precision of the bundle (default: the fastest that passed)"
    )
    parser.add_argument(
        "--hash",
        choices=("stat", "content"),
        default="stat",
        help="how a resume checks a folder source for changes: paths, sizes and mtimes "
        "(stat, default) or the files' bytes (content: files touched without a change)",
    )
    parser.add_argument(
        "--to",
        metavar="URL",
        help="also upsert the ok rows into lancedb://PATH/TABLE, qdrant://HOST:PORT/COLLECTION "
        "or qdrant:///local/path/COLLECTION (lancedb / qdrant extra)",
    )
    add_arguments(parser, Options, skip=("allow_files",))
    parser.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="embed with Ray Data actors: a cluster address (e.g. auto), or none for a local "
        "instance (ray extra)",
    )
    parser.set_defaults(handler=embed_command)
