"""Datasets, prompt templates, the synthetic task and the tokenizer."""
