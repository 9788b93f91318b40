"""`clipedge embed`: embed a folder, list or table of images or texts into Parquet shards.

Resumable (finished shards are kept, partial ones redone), nothing lost (one row per input,
`ok` or `error` with the reason), decoding in worker processes overlapped with inference.
A thin layer over the runtime's towers and pipeline. Needs the `batch` extra (pyarrow).
"""
