"""Tokenizers for prep, training, eval and export, all through HF `tokenizers`.

Three kinds (the `--tokenizer` argument of `llm-lru prep`):
- `bytes`: id b is the byte b (0..255), then `<|endoftext|>` = 256 (EOS, also used as BOS) and
  `<|pad|>` = 257. Vocabulary 258; no training. A byte-level BPE without merges, so the saved
  tokenizer.json loads anywhere `tokenizers` does.
- `bpe:N`: a byte-level BPE of vocabulary N trained on the (train split of the) input, with the
  same two special tokens at ids 0 (`<|endoftext|>`) and 1 (`<|pad|>`).
- a path to a tokenizer.json or a folder holding one (HF layout; EOS/BOS/PAD taken from its
  tokenizer_config.json when present, else from well-known special-token names).

The prep output folder always holds `tokenizer.json`; the manifest records kind, sha256,
vocab_size and the special ids, so `load_tokenizer(dir)` gives the same tokenizer back.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Union

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
PAD = "<|pad|>"
# Names tried, in order, when a user-supplied tokenizer has no tokenizer_config.json.
EOS_NAMES = (EOS, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (what ByteLevel pre-tokenizers use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _byte_level(tok: Tokenizer) -> Tokenizer:
    # use_regex=False: no word splitting, so a BPE never merges across what GPT-2 would split.
    # For the bytes tokenizer it is irrelevant; for bpe:N we keep GPT-2's regex split.
    tok.decoder = decoders.ByteLevel()
    return tok


def bytes_tokenizer() -> Tokenizer:
    """The `bytes` tokenizer: id == byte value, EOS 256, PAD 257."""
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    _byte_level(tok)
    tok.add_special_tokens([EOS, PAD])
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` (>= 258) on `texts`; specials at ids 0 and 1."""
    if vocab_size < 258:
        raise ValueError(f"--tokenizer bpe:{vocab_size}: vocabulary must be >= 258 (256 bytes + 2 specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    _byte_level(tok)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


@dataclass
class LoadedTokenizer:
    """A `tokenizers.Tokenizer` (`.hf`) with the special ids the project relies on.

    encode(text) -> list of ids (special-token strings in the text stay plain text);
    decode(ids) -> str; vocab_size counts added tokens; eos_id separates packed documents.
    Other attributes (get_vocab_size, token_to_id, id_to_token, ...) are the HF tokenizer's.
    """

    hf: Tokenizer
    eos_id: int
    bos_id: int
    pad_id: int
    kind: str = "path"

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        """As `tokenizers.Tokenizer.get_vocab_size` (with the special tokens by default)."""
        return self.hf.get_vocab_size(with_added_tokens=with_added_tokens)

    def __getattr__(self, name):
        # Anything else (token_to_id, id_to_token, save, ...) is the HF tokenizer's.
        if name == "hf":
            raise AttributeError(name)
        return getattr(self.hf, name)

    def encode(self, text: str) -> List[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def specials(self) -> Dict[str, int]:
        return {"eos_id": self.eos_id, "bos_id": self.bos_id, "pad_id": self.pad_id}


def _wrap(tok: Tokenizer, kind: str, eos: Optional[str] = None, bos: Optional[str] = None,
          pad: Optional[str] = None, where: str = "tokenizer") -> LoadedTokenizer:
    # Corpus text that happens to contain "<|endoftext|>" must not become a real EOS.
    tok.encode_special_tokens = True
    vocab = tok.get_vocab(with_added_tokens=True)
    if eos is None:
        eos = next((n for n in EOS_NAMES if n in vocab), None)
        if eos is None:
            raise ValueError(f"{where}: no EOS token found (tried {', '.join(EOS_NAMES)}); pass --eos-token")
    if eos not in vocab:
        raise ValueError(f"{where}: EOS token '{eos}' is not in the vocabulary")
    eos_id = vocab[eos]
    bos_id = vocab.get(bos, eos_id) if bos else eos_id
    pad_id = vocab.get(pad, vocab.get(PAD, eos_id)) if pad else vocab.get(PAD, eos_id)
    return LoadedTokenizer(tok, eos_id=eos_id, bos_id=bos_id, pad_id=pad_id, kind=kind)


def _special_name(v) -> Optional[str]:
    # tokenizer_config.json stores specials as a string or as {"content": ...}.
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def from_path(path: Union[str, Path], eos_token: Optional[str] = None) -> LoadedTokenizer:
    """Load a tokenizer.json file or a folder with tokenizer.json (and maybe tokenizer_config.json)."""
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise ValueError(f"--tokenizer {path}: no tokenizer.json found there")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:
        raise ValueError(f"--tokenizer {path}: {file} is not a tokenizers JSON file: {e}") from None
    cfg_file = file.parent / "tokenizer_config.json"
    bos = pad = None
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        eos_token = eos_token or _special_name(cfg.get("eos_token"))
        bos, pad = _special_name(cfg.get("bos_token")), _special_name(cfg.get("pad_token"))
    return _wrap(tok, "path", eos=eos_token, bos=bos, pad=pad, where=str(file))


def make_tokenizer(spec: str, texts: Optional[Iterable[str]] = None, eos_token: Optional[str] = None) -> LoadedTokenizer:
    """`bytes`, `bpe:N` (trains on `texts`) or a path; see the module docstring."""
    if spec == "bytes":
        return _wrap(bytes_tokenizer(), "bytes", eos=EOS, pad=PAD)
    if spec.startswith("bpe:"):
        try:
            n = int(spec[4:])
        except ValueError:
            raise ValueError(f"--tokenizer {spec}: expected bpe:N with an integer N") from None
        if texts is None:
            raise ValueError("--tokenizer bpe:N needs training texts")
        return _wrap(train_bpe(texts, n), f"bpe:{n}", eos=EOS, pad=PAD)
    return from_path(spec, eos_token=eos_token)


def sha256_file(path: Union[str, Path], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def save_tokenizer(tok: LoadedTokenizer, out_dir: Union[str, Path]) -> Dict[str, object]:
    """Write out_dir/tokenizer.json; return the manifest's `tokenizer` record."""
    path = Path(out_dir) / "tokenizer.json"
    tmp = path.with_suffix(".json.tmp")
    tok.hf.save(str(tmp))
    os.replace(tmp, path)
    return {"file": "tokenizer.json", "kind": tok.kind, "sha256": sha256_file(path),
            "vocab_size": tok.vocab_size, **tok.specials(),
            "eos_token": tok.hf.id_to_token(tok.eos_id), "pad_token": tok.hf.id_to_token(tok.pad_id)}


def load_tokenizer(dir_or_manifest: Union[str, Path, dict]) -> LoadedTokenizer:
    """The tokenizer a prep folder was made with: pass the folder, its manifest.json, or the
    manifest dict (which must then carry `_dir`, as read_manifest's result does)."""
    if isinstance(dir_or_manifest, dict):
        manifest = dir_or_manifest
        if "_dir" not in manifest or "tokenizer" not in manifest:
            raise ValueError("load_tokenizer: a manifest dict needs '_dir' and 'tokenizer' (use read_manifest(dir))")
        base = Path(manifest["_dir"])
    else:
        p = Path(dir_or_manifest)
        base = p.parent if p.is_file() else p
        from llm_lru.data_prep.manifest import read_manifest
        manifest = read_manifest(base)
    rec = manifest["tokenizer"]
    file = base / rec["file"]
    if not file.is_file():
        raise ValueError(f"{file}: tokenizer file named by {base / 'manifest.json'} is missing")
    if sha256_file(file) != rec["sha256"]:
        raise ValueError(f"{file}: sha256 does not match the manifest (tokenizer changed after prep)")
    tok = Tokenizer.from_file(str(file))
    tok.encode_special_tokens = True
    return LoadedTokenizer(tok, eos_id=rec["eos_id"], bos_id=rec["bos_id"], pad_id=rec["pad_id"], kind=rec["kind"])
