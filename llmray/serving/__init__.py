"""Serving: an OpenAI-compatible HTTP API on Ray Serve around vLLM's async engine, plus quantization and
speculative decoding."""
