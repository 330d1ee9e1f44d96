"""llm-worker-rbee: one process, one model, an OpenAI-compatible streaming server."""
