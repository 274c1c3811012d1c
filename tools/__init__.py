"""Tools that sit above the builder and the runtime: GGUF import and the default-model cache."""
