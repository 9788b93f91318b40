"""`clipedge serve`: an embedding microservice speaking the Jina and OpenAI embeddings APIs.

A thin layer over the runtime's towers and pipeline: requests are parsed and prepared (tokenised, or
fetched, decoded and preprocessed) outside the model threads, one batcher per tower runs
items of many requests together, and each request finishes its own rows. Needs the `serve`
extra (FastAPI, uvicorn, prometheus-client).
"""
