"""Text encoders and their tokenizers: CLIP-L, OpenCLIP-bigG, T5 v1.1, ..."""
