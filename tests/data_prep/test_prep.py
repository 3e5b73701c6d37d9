"""`llm-lru prep`: packing, round trip, document starts, determinism, resume, bad input, verify."""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from llm_lru.data_prep import corpus, load_tokenizer, read_manifest, verify
from llm_lru.data_prep import prep as P
from llm_lru.data_prep.cli import main as cli_main
from llm_lru.data_prep.shards import read_samples
from llm_lru.data_prep.tokenizer import bytes_tokenizer

from .conftest import write_corpus


def split_samples(out, split="train", max_shards=None):
    """All samples of a split in order: tokens (S, L+1) and starts (list of position arrays)."""
    m = read_manifest(out)
    toks, starts = [], []
    for sh in m["splits"][split]["shards"][:max_shards]:
        for t, s in read_samples(str(Path(out) / sh["name"]), m["seq_len"], dtype=m["dtype"]):
            toks.append(t.astype(np.int64))
            starts.append(s)
    return np.stack(toks), starts


def expected_stream(docs, tok):
    """The reference packing: doc EOS doc EOS ..., encoded by the HF tokenizer, with start flags."""
    ids, flags = [], []
    for d in docs:
        e = tok.encode(d)
        ids += e + [tok.eos_id]
        flags += [True] + [False] * len(e)
    return np.array(ids), np.array(flags)


def file_hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


def test_round_trip_and_doc_starts(small_prep, corpus_dir):
    _, docs = corpus_dir
    tok = load_tokenizer(small_prep)
    ref_ids, ref_flags = expected_stream(docs, tok)     # HF encode, not prep's byte fast path
    toks, starts = split_samples(small_prep)
    L = read_manifest(small_prep)["seq_len"]
    n = toks.size
    assert toks.shape[1] == L + 1
    assert len(ref_ids) - n < L + 1                      # only a tail shorter than a sample is dropped
    np.testing.assert_array_equal(toks.reshape(-1), ref_ids[:n])
    flags = np.zeros_like(toks, bool)
    for r, s in enumerate(starts):
        flags[r, s] = True
    np.testing.assert_array_equal(flags.reshape(-1), ref_flags[:n])
    # Decoding the stream split at EOS gives the input documents back.
    stream = toks.reshape(-1).tolist()
    texts, cur = [], []
    for t in stream:
        if t == tok.eos_id:
            texts.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    assert texts == docs[: len(texts)] and len(texts) >= len(docs) - 1
    m = read_manifest(small_prep)
    assert m["splits"]["train"]["samples"] == len(toks)
    assert m["stats"]["dropped_tokens"] == len(ref_ids) - n
    assert m["tokenizer"]["eos_id"] == 256 and m["tokenizer"]["pad_id"] == 257 and tok.vocab_size == 258


def test_bytes_tokenizer_ids_are_bytes():
    tok = bytes_tokenizer()
    tok.encode_special_tokens = True
    text = "héllo <|endoftext|> 日本\x00\t"
    assert tok.encode(text, add_special_tokens=False).ids == list(text.encode("utf-8"))


def test_bpe_round_trip_and_determinism(corpus_dir, tmp_path):
    root, docs = corpus_dir
    cfg = dict(inputs=[str(root)], tokenizer="bpe:300", seq_len=16, shard_size=8)
    P.run_prep(P.PrepConfig(**cfg), tmp_path / "a", workers=1, progress=False)
    P.run_prep(P.PrepConfig(**cfg), tmp_path / "b", workers=2, progress=False)
    assert file_hashes(tmp_path / "a") == file_hashes(tmp_path / "b")
    tok = load_tokenizer(tmp_path / "a")
    assert tok.vocab_size == 300 and tok.eos_id == 0
    toks, _ = split_samples(tmp_path / "a")
    ref, _ = expected_stream(docs, tok)
    np.testing.assert_array_equal(toks.reshape(-1), ref[: toks.size])
    assert tok.decode(ref[: ref.tolist().index(tok.eos_id)]) == docs[0]


def test_determinism_across_worker_counts(corpus_dir, tmp_path):
    cfg = dict(inputs=[str(corpus_dir[0])], seq_len=24, shard_size=7, val_fraction=0.3, seed=3)
    P.run_prep(P.PrepConfig(**cfg), tmp_path / "a", workers=1, progress=False)
    P.run_prep(P.PrepConfig(**cfg), tmp_path / "b", workers=2, progress=False)
    ha, hb = file_hashes(tmp_path / "a"), file_hashes(tmp_path / "b")
    assert ha == hb and any(n.startswith("val-") for n in ha)
    P.run_prep(P.PrepConfig(**{**cfg, "seed": 4}), tmp_path / "c", workers=1, progress=False)
    assert file_hashes(tmp_path / "c") != ha        # the seed moves documents between splits
    # The split does not depend on where the corpus lives (only the manifest's paths differ).
    import shutil
    shutil.copytree(corpus_dir[0], tmp_path / "moved" / "elsewhere")
    P.run_prep(P.PrepConfig(**{**cfg, "inputs": [str(tmp_path / "moved")]}), tmp_path / "d", workers=1, progress=False)
    hd = file_hashes(tmp_path / "d")
    assert {k: v for k, v in hd.items() if k.endswith(".tar")} == {k: v for k, v in ha.items() if k.endswith(".tar")}


def test_val_split_by_document(stdlib_prep):
    m = read_manifest(stdlib_prep)
    tok = load_tokenizer(stdlib_prep)
    tr, _ = split_samples(stdlib_prep, "train", max_shards=4)
    va, _ = split_samples(stdlib_prep, "val")
    def docs(t):  # complete documents only (between two EOS); bytes tokenizer: id == byte
        flat = t.reshape(-1)
        cut = np.flatnonzero(flat == tok.eos_id)
        return {bytes(flat[a + 1: b].astype(np.uint8)).decode("utf-8") for a, b in zip(cut[:-1], cut[1:])}
    dt, dv = docs(tr), docs(va)
    assert dt and dv and not (dt & dv)
    files = corpus.stdlib_files()
    texts = {Path(f).read_text(encoding="utf-8") for f in files[:400]}
    assert dv <= texts and dt <= texts
    frac = m["splits"]["val"]["documents"] / (m["splits"]["val"]["documents"] + m["splits"]["train"]["documents"])
    assert 0.02 < frac < 0.3


@pytest.mark.parametrize("workers", [1, 2])
def test_resume_keeps_finished_shards(corpus_dir, tmp_path, monkeypatch, workers):
    monkeypatch.setattr(corpus, "TASK_BYTES", 600)        # one small file per task: many resume points
    monkeypatch.setattr(P, "SAVE_EVERY_S", 0.0)
    cfg = dict(inputs=[str(corpus_dir[0])], seq_len=16, shard_size=6)
    P.run_prep(P.PrepConfig(**cfg), tmp_path / "ref", workers=1, progress=False)

    real = P.write_shard
    def failing(path, *a, **k):                          # runs in the pool's workers too (fork)
        if Path(path).name == "shard-000008.tar":
            raise RuntimeError("simulated crash")
        return real(path, *a, **k)
    monkeypatch.setattr(P, "write_shard", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        P.run_prep(P.PrepConfig(**cfg), tmp_path / "run", workers=workers, progress=False)
    state = json.loads((tmp_path / "run" / P.STATE).read_text())
    done = [s["name"] for s in state["shards"]["train"]]
    assert 0 < len(done) < 9 and not (tmp_path / "run" / "manifest.json").exists()
    stamps = {n: os.stat(tmp_path / "run" / n).st_mtime_ns for n in done}

    monkeypatch.setattr(P, "write_shard", real)
    P.run_prep(P.PrepConfig(**cfg), tmp_path / "run", workers=workers, progress=False)
    # Finished shards were not written again; the result is the uninterrupted run's, byte for byte.
    assert {n: os.stat(tmp_path / "run" / n).st_mtime_ns for n in done} == stamps
    assert file_hashes(tmp_path / "run") == file_hashes(tmp_path / "ref")
    # Running the same command on the finished folder is a no-op.
    P.run_prep(P.PrepConfig(**cfg), tmp_path / "run", workers=workers, progress=False)
    assert file_hashes(tmp_path / "run") == file_hashes(tmp_path / "ref")


def test_bad_files_are_counted_not_fatal(tmp_path):
    root = tmp_path / "in"
    docs = write_corpus(root, n_files=3)
    (root / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))        # not UTF-8
    (root / "broken.jsonl.gz").write_bytes(b"this is not gzip")
    (root / "lines.jsonl").write_text('{"text": "ok one"}\nnot json\n{"other": 1}\n{"text": "ok two"}\n')
    (root / "empty.md").write_text("")
    m = P.run_prep(P.PrepConfig(inputs=[str(root)], seq_len=8, shard_size=50), tmp_path / "out", progress=False)
    bad = {Path(b["path"]).name for b in m["stats"]["bad_files"]}
    assert bad == {"latin1.txt", "broken.jsonl.gz"}
    assert m["stats"]["bad_records"] == 2 and m["stats"]["empty_documents"] == 1
    assert m["stats"]["documents"] == len(docs) + 2


def test_empty_corpus_and_bad_arguments(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("")
    (tmp_path / "in" / "b.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match="empty corpus"):
        P.run_prep(P.PrepConfig(inputs=[str(tmp_path / "in")], seq_len=8), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="matches no supported file"):
        P.run_prep(P.PrepConfig(inputs=[str(tmp_path / "nothing*.txt")], seq_len=8), tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="--seq-len"):
        P.run_prep(P.PrepConfig(inputs=[str(tmp_path / "in")], seq_len=1), tmp_path / "out", progress=False)
    (tmp_path / "in" / "c.txt").write_text("short")
    with pytest.raises(ValueError, match="corpus too small"):
        P.run_prep(P.PrepConfig(inputs=[str(tmp_path / "in")], seq_len=64), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_existing_folder_of_another_command_is_refused(small_prep, corpus_dir, tmp_path):
    before = file_hashes(small_prep)
    with pytest.raises(ValueError, match="different command"):
        P.run_prep(P.PrepConfig(inputs=[str(corpus_dir[0])], seq_len=48, shard_size=10), small_prep, progress=False)
    assert file_hashes(small_prep) == before
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a prep folder"):
        P.run_prep(P.PrepConfig(inputs=[str(corpus_dir[0])], seq_len=48), other, progress=False)
    assert (other / "notes.txt").read_text() == "keep me" and len(list(other.iterdir())) == 1


def test_verify_names_corrupted_shard(corpus_dir, tmp_path, capsys):
    out = tmp_path / "v"
    assert cli_main(["--input", str(corpus_dir[0]), "--seq-len", "16", "--shard-size", "8", "--out", str(out),
                     "--workers", "1", "--quiet"]) == 0
    assert cli_main(["--verify", str(out)]) == 0
    assert verify(out) == []
    shard = out / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify(out)
    assert len(problems) == 1 and "shard-000001.tar" in problems[0]
    assert cli_main(["--verify", str(out)]) == 1
    assert "shard-000001.tar" in capsys.readouterr().err
    # A truncated shard (tar structure broken) is caught too, by checksum and by the tar reader.
    shard2 = out / "shard-000002.tar"
    shard2.write_bytes(shard2.read_bytes()[:1500])
    assert any("shard-000002.tar" in p for p in verify(out))
    with pytest.raises(ValueError, match="shard-000002.tar"):
        list(read_samples(str(shard2), 16))


def test_cli_errors_are_clear(tmp_path, capsys):
    assert cli_main(["--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert cli_main(["--corpus", "python-stdlib"]) == 2
    assert "--out" in capsys.readouterr().err


def test_stdlib_corpus_is_capped_and_starts_with_first_file(stdlib_prep):
    m = read_manifest(stdlib_prep)
    assert 1 << 20 <= m["stats"]["bytes"] < (1 << 20) + (1 << 20)
    tok = load_tokenizer(stdlib_prep)
    first = Path(corpus.stdlib_files()[0]).read_text(encoding="utf-8")
    train, _ = split_samples(stdlib_prep, "train", max_shards=1)
    val, _ = split_samples(stdlib_prep, "val", max_shards=1)
    # The first file (sorted order) opens whichever split its document fell into.
    assert len(first) > 128 and (first.startswith(tok.decode(train[0])) or first.startswith(tok.decode(val[0])))


def test_jsonl_byte_ranges_read_every_line_once(tmp_path, monkeypatch):
    import random
    from .conftest import random_text
    rng = random.Random(5)
    lines = [random_text(rng, rng.randint(1, 30)) for _ in range(60)]
    (tmp_path / "big.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    cfg = dict(inputs=[str(tmp_path / "big.jsonl")], seq_len=16, shard_size=20)
    P.run_prep(P.PrepConfig(**cfg), tmp_path / "whole", progress=False)
    monkeypatch.setattr(corpus, "RANGE_BYTES", 97)       # ranges cut lines anywhere
    tasks, _ = corpus.make_tasks([str(tmp_path / "big.jsonl")])
    assert sum(len(t.pieces) for t in tasks) > 20
    docs = [d for t in tasks for p in t.pieces for d in corpus.read_piece(p)[0]]
    assert docs == lines
    P.run_prep(P.PrepConfig(**cfg), tmp_path / "ranges", workers=2, progress=False)
    tars = lambda d: {k: v for k, v in file_hashes(d).items() if k.endswith(".tar")}
    assert tars(tmp_path / "ranges") == tars(tmp_path / "whole")


def test_tokenizer_given_by_path(corpus_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from llm_lru.data_prep.tokenizer import make_tokenizer
    folder = tmp_path / "tok"
    folder.mkdir()
    base = make_tokenizer("bpe:300", [d for d in corpus_dir[1]])
    base.hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|pad|>", "pad_token": {"content": "<|endoftext|>"}}))
    m = P.run_prep(P.PrepConfig(inputs=[str(corpus_dir[0])], tokenizer=str(folder), seq_len=16, shard_size=50),
                   tmp_path / "out", progress=False)
    t = m["tokenizer"]
    assert t["kind"] == "path" and t["eos_id"] == 1 and t["pad_id"] == 0 and t["vocab_size"] == 300
    assert m["config"]["tokenizer_sha256"] == hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()
    toks, _ = split_samples(tmp_path / "out")
    assert (toks == 1).any()                             # the configured EOS separates documents
    # A tokenizer without any known EOS needs --eos-token.
    plain = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    plain.save(str(tmp_path / "plain.json"))
    with pytest.raises(ValueError, match="--eos-token"):
        P.run_prep(P.PrepConfig(inputs=[str(corpus_dir[0])], tokenizer=str(tmp_path / "plain.json"), seq_len=16),
                   tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()


def test_val_split_by_default_holds_at_least_one_sample(corpus_dir, small_prep, tmp_path):
    """The CLI carves a val split without being asked; on a corpus too small for the hash to pick
    a document, the last train sample becomes the val split and nothing is lost or duplicated."""
    out = tmp_path / "default"
    assert cli_main(["--input", str(corpus_dir[0]), "--tokenizer", "bytes", "--seq-len", "32",
                     "--shard-size", "10", "--out", str(out), "--workers", "1", "--quiet"]) == 0
    m = read_manifest(out)
    assert m["config"]["val_fraction"] == 0.005
    assert m["splits"]["val"]["samples"] == 1
    no_val, _ = split_samples(small_prep)   # the same corpus and packing, no val split
    train, _ = split_samples(out)
    val, val_starts = split_samples(out, "val")
    # The hash picked no document here: the val sample is the no-val run's last sample.
    np.testing.assert_array_equal(np.concatenate([train, val]), no_val)
    assert val_starts[0].tolist() == split_samples(small_prep)[1][-1].tolist()
    # Every shard but the last is full, as before (the held-back sample changed no shard's size).
    sizes = [s["samples"] for s in m["splits"]["train"]["shards"]]
    assert all(n == 10 for n in sizes[:-1]) and verify(out) == []


def test_val_fraction_zero_means_no_val_split(corpus_dir, tmp_path):
    out = tmp_path / "noval"
    assert cli_main(["--input", str(corpus_dir[0]), "--tokenizer", "bytes", "--seq-len", "32",
                     "--out", str(out), "--workers", "1", "--quiet", "--val-fraction", "0"]) == 0
    assert list(read_manifest(out)["splits"]) == ["train"]


def test_sigterm_to_the_process_group_interrupts_cleanly_and_the_rerun_completes_it(tmp_path):
    """`llm-lru prep` with a worker pool, SIGTERM to its whole process group (as SLURM or a shutdown
    sends it) once shards are being written: it exits 130 saying so, leaves no partial (*.tmp) file
    and no manifest (the folder does not look complete), and the same command run again finishes
    with shards byte-identical to an uninterrupted prep."""
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}

    def cmd(out, workers):
        return [sys.executable, "-m", "llm_lru.cli", "prep", "--corpus", "python-stdlib", "--tokenizer", "bytes",
                "--seq-len", "64", "--shard-size", "50", "--max-bytes", "1M", "--out", str(out),
                "--workers", str(workers), "--quiet"]

    out = tmp_path / "cut"
    proc = subprocess.Popen(cmd(out, 2), env=env, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 300
    while not list(out.glob("shard-*.tar")) and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)
    printed, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, printed
    assert "interrupted (signal SIGTERM)" in printed and "Traceback" not in printed, printed
    assert not list(out.glob("*.tmp")) and not (out / "manifest.json").exists()
    assert (out / P.STATE).exists()
    again = subprocess.run(cmd(out, 2), env=env, cwd=repo, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    ref = subprocess.run(cmd(tmp_path / "ref", 1), env=env, cwd=repo, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    digest = lambda d: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.tar"))}  # noqa: E731
    assert digest(out) == digest(tmp_path / "ref") and len(digest(out)) > 2
    assert read_manifest(out)["splits"] == read_manifest(tmp_path / "ref")["splits"]
