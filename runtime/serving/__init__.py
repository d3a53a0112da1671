"""``runtime serve``: an OpenAI-compatible HTTP server over the engine's continuous batching.

  protocol     request JSON -> a validated Generation (400s say which field is wrong)
  engine_loop  the one thread that owns the engine: admits, steps, aborts, hands out tokens
  scoring      log-probabilities and OpenAI's presence / frequency penalties on a step's logits
  responses    OpenAI's response and stream-chunk shapes
  metrics      the Prometheus registry behind GET /metrics
  app          the FastAPI routes, errors in OpenAI's shape, one log line per request
"""
