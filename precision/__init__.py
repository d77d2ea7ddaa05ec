"""Precision tooling (`internvl-eval`): an artifact against a reference, TextVQA accuracy, a CLIP judge.

A compile-side / development tool: it may use transformers; the runtime never imports it.
"""
