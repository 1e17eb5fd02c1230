"""llmray: the whole life of a language model on Ray."""
__version__ = "0.1.0"
