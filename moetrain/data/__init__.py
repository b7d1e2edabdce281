"""Embedded training data: the stdlib corpus, its tokenizer and batch pipelines."""
