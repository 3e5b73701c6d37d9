"""llm_lru: distributed pretraining of hybrid linear-recurrent / attention language models."""
__version__ = "0.1.0"
