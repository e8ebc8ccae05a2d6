"""Export: merged Hugging Face model directories (GGUF and Ollama to come)."""
