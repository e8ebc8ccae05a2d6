"""``tunesmith deploy``: an OpenAI-compatible HTTP server with a web chat page."""
