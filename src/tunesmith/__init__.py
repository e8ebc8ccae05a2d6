"""tunesmith: fine-tune open chat LLMs and put the result to work."""

__version__ = "0.1.0"
