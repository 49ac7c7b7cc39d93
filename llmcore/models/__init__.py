"""Model definitions only: no parallelism, no precision (applied from outside).

Import models from their modules, e.g. ``from llmcore.models.gpt import GPT``.
"""
