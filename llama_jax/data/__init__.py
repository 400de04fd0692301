"""The input pipeline: TFDS sources, tokenizers (three formats), packing, per-host loading."""
