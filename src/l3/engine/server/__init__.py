"""`l3 serve`: the engine behind an OpenAI-compatible HTTP API (needs the `serve` extra: FastAPI, uvicorn,
prometheus-client), and `l3 loadtest`, which replays a workload's lengths against it."""
