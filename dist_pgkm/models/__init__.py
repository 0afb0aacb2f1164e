"""Model sources read lazily (HF dirs, safetensors and GGUF files), layer selection, the real
models installable offline, and calibration."""
