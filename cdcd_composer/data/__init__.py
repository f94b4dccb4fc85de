"""Data preparation and reading.

Stories in (`sources`), token canvases out (`encoding`), MDS shards on disk or S3 (`store`),
their statistics (`stats`), the tokenizer (`tokenization`), the offline synthetic corpus
(`grammar`), and a converted dataset read back (`metadata`, `loaders`).
"""
