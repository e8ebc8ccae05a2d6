"""Model loading: local dirs, GGUF files, the embedded demo models, hub ids; LoRA."""
