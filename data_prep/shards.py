"""Reading prep shards with webdataset, with errors that name the shard.

The loader decides itself which samples each rank and worker reads (loader.py, from the
manifest's sample counts), so webdataset's own splitting is switched off on purpose:
- nodesplitter=None: its default (`single_node_only`) raises as soon as there are several ranks;
- workersplitter=None: we open one shard per call, already chosen for this worker; webdataset's
  `split_by_worker` would hand it to one worker only and leave the others empty;
- empty_check=False: an empty per-worker stream is a planned case, not an error (our counts
  are checked against the manifest instead);
- shardshuffle=False: shard order is shuffled by the loader's seeded plan (exact resume).
"""
from __future__ import annotations

from typing import Iterator, Tuple

import numpy as np


def _load_npy(b: bytes, dtype: np.dtype) -> np.ndarray:
    """1-D .npy bytes of a known dtype -> array, without np.load's header parsing (half the
    loader's time at short seq_len). prep writes little-endian 1-D arrays only."""
    if b[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy member")
    head = 10 + int.from_bytes(b[8:10], "little") if b[6] == 1 else 12 + int.from_bytes(b[8:12], "little")
    return np.frombuffer(b, dtype, offset=head)


def read_samples(url: str, seq_len: int, skip: int = 0, dtype: str = "uint16") -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Yield (tokens (L+1,) of `dtype`, starts (int32 positions)) of one shard, after `skip`.

    Any tar or decoding failure is a ValueError that names the shard.
    """
    import webdataset as wds

    ds = wds.WebDataset([url], nodesplitter=None, workersplitter=None, shardshuffle=False,
                        empty_check=False)
    i = 0
    try:
        for sample in ds:
            if i >= skip:
                tokens = _load_npy(sample["tokens.npy"], np.dtype(dtype).newbyteorder("<"))
                if tokens.shape != (seq_len + 1,):
                    raise ValueError(f"sample {sample.get('__key__')} has tokens of shape {tokens.shape}, "
                                     f"expected ({seq_len + 1},)")
                yield tokens, _load_npy(sample["starts.npy"], np.dtype("<i4"))
            i += 1
    except GeneratorExit:
        raise
    except Exception as e:
        raise ValueError(f"shard {url}: broken ({type(e).__name__}: {e})") from None
