"""Model sources (today: the real models installable offline; next: HF dirs, safetensors and
GGUF files read lazily)."""
