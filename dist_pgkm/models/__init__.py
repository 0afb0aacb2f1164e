"""Model sources: Hugging Face dirs, safetensors and GGUF files, and the packaged real models."""
