"""Serving a checkpoint over HTTP: an OpenAI-compatible API with batched decoding, metrics and a chat page.

`engine` decodes requests in batches on a worker thread; `app` is the FastAPI application; `schemas` the
request and response bodies. Needs the serve extra: pip install 'llmmo[serve]'.
"""
