"""f2llm: turn a decoder LLM into a text-embedding model with the F2LLM recipe."""

__version__ = "0.1.0"
