"""Inference: generation engine and the chat loop."""
