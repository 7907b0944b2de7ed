"""`llm serve`: OpenAI- and Anthropic-compatible HTTP server over a continuous-batching engine."""
