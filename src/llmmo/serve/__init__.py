"""Serving a checkpoint over HTTP: an OpenAI-compatible API with batched decoding, metrics and a chat page.

`batch` is the running batch (continuous batching over one KV cache); `engine` decodes it on a worker thread,
and `worker` runs that engine in a process of its own; `app` is the FastAPI application; `schemas` the request
and response bodies. Needs the serve extra: pip install 'llmmo[serve]'.
"""
