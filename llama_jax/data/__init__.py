"""The input pipeline: TFDS sources, a sentencepiece tokenizer, packing, per-host loading."""
