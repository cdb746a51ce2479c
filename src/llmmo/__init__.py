"""llmmo: Large Language Model Matrix Operations: from raw text to a trained, evaluated, sampling Transformer."""

__version__ = "0.1.0"
