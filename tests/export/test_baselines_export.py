"""An export of a stack with the baseline mixers (LSTM, DeltaNet) loads in plain transformers and
computes what the training model does: full forward, chunked prefill + steps, cached generation."""
from llm_lru.config import ModelConfig

from .test_folder import _export, round_trip


def test_lstm_and_deltanet_round_trip(tmp_path):
    cfg = ModelConfig(vocab_size=50, d_model=24, n_layers=3, pattern="CDA", d_state=12, n_heads=2)
    round_trip(*_export(tmp_path, cfg))
