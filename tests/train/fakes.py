"""Stand-ins used until the model and data pieces land (same interfaces as theirs)."""
from __future__ import annotations

import torch
import torch.nn as nn


class TinyLM(nn.Module):
    """Embedding -> blocks of (linear + tanh) -> head; forward(input_ids, doc_start, pos_offset)."""

    def __init__(self, vocab: int = 64, d: int = 16, n_layers: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(n_layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, doc_start=None, pos_offset=0):
        x = self.emb(input_ids)
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return self.head(x)


class RandomLoader:
    """Seeded random batches for (dp_rank, sp_rank); state = batches consumed."""

    def __init__(self, cfg, split, dp_rank, dp_size, sp_rank, sp_size, batch_size):
        self.vocab = cfg.model.vocab_size
        self.T = cfg.train.seq_len
        self.sp_rank, self.sp_size, self.B = sp_rank, sp_size, batch_size
        self.seed = cfg.train.seed + (7919 if split == "val" else 0)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.pos = 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.pos)
            glob = torch.randint(0, self.vocab, (self.B * self.dp_size, self.T + 1), generator=g)
            rows = glob[self.dp_rank * self.B:(self.dp_rank + 1) * self.B]
            tl = self.T // self.sp_size
            sl = slice(self.sp_rank * tl, (self.sp_rank + 1) * tl)
            ds = torch.zeros(self.B, self.T, dtype=torch.bool)
            ds[:, 0] = True
            self.pos += 1
            yield {"input_ids": rows[:, :-1][:, sl].clone(), "labels": rows[:, 1:][:, sl].clone(),
                   "doc_start": ds[:, sl].clone()}
