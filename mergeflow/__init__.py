"""mergeflow: streaming, data-aware merging of fine-tuned language models."""

__version__ = "0.1.0"
