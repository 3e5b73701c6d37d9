"""Chunked prefill under sequence parallelism (llm_lru.eval.prefill with a mesh) against the
one-process run: token log-probs, the state after the input, the last logits and greedy tokens.

One world of 3 gloo processes: sp = 2 on ranks [0, 1] and sp = 3 on all three. The tiny hybrid
holds every causal mixer kind (lru, glru, bdlru, hlru, attention, sliding window), with a window
smaller (3) and larger (9) than a slice; document starts inside chunks and on slice edges; an
input length (47) that no chunk divides, so the last chunk ends with a tail of < sp tokens read
replicated. Each rank computes the sp = 1 reference itself.
"""
import torch
import torch.distributed as dist

from llm_lru.eval.prefill import greedy_generate, prefill, token_logprobs
from llm_lru.parallel.mesh import Mesh
from llm_lru.parallel.parallelize import parallelize, sp_seams
from tests.distributed import run_world
from tests.eval.helpers import tiny_model
from tests.parallel.cases import check_results, close, sp_groups

T, CHUNK = 47, 12


def _inputs():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 258, (2, T), generator=g)
    docs = torch.rand(2, T, generator=g) < 0.08
    docs[:, 0] = True
    docs[0, 18] = True   # a slice edge at sp = 2 and sp = 3 (chunk 12..24, slices of 6 / 4)
    docs[1, 40] = True   # inside the last, uneven chunk
    return ids, docs


def _compare_state(got, want, tag, errors):
    if got.pos != want.pos:
        errors.append(f"{tag}: state.pos {got.pos} != {want.pos}")
    for i, (a, b) in enumerate(zip(got.layers, want.layers)):
        if isinstance(b, dict):
            for key in ("k", "v"):
                close(a[key], b[key], f"{tag}: layer {i} cache {key}", errors)
            if not torch.equal(a["starts"], b["starts"]):
                errors.append(f"{tag}: layer {i} cache starts differ")
        else:
            close(a, b, f"{tag}: layer {i} state", errors)


def _world(rank, world):
    errors, n = [], 0
    ids, docs = _inputs()
    for k, (group, r) in sp_groups(world, (2, 3)).items():
        if group is None:
            continue
        mesh = Mesh(world_size=k, rank=r, dp=1, sp=k, backend="gloo", sp_group=group, world_group=group,
                    sp_ranks=dist.get_process_group_ranks(group))
        for window in (3, 9):
            tag = f"sp={k} window={window}"
            ref = tiny_model(seed=1, window=window)
            want_lp, want_greedy = token_logprobs(ref, ids, CHUNK, doc_start=docs)
            want_last, want_state = prefill(ref, ids, CHUNK, doc_start=docs)
            want_tokens = greedy_generate(ref, want_state, want_last, 4)

            model = parallelize(tiny_model(seed=1, window=window), mesh)
            if set(sp_seams(model).values()) != {"scan", "attend"}:
                errors.append(f"{tag}: seams {sp_seams(model)}")
            lp, greedy = token_logprobs(model, ids, CHUNK, doc_start=docs, mesh=mesh)
            if not torch.equal(torch.isnan(lp), torch.isnan(want_lp)):
                errors.append(f"{tag}: scored positions differ")
            close(torch.nan_to_num(lp), torch.nan_to_num(want_lp), f"{tag}: token log-probs", errors)
            if not torch.equal(greedy, want_greedy):
                errors.append(f"{tag}: greedy hits differ")
            last, state = prefill(model, ids, CHUNK, doc_start=docs, mesh=mesh)
            close(last, want_last, f"{tag}: last logits", errors)
            _compare_state(state, want_state, tag, errors)
            tokens = greedy_generate(model, state, last, 4)
            if not torch.equal(tokens, want_tokens):
                errors.append(f"{tag}: greedy tokens {tokens.tolist()} != {want_tokens.tolist()}")
            # A chunk shorter than sp (a prompt of 2 tokens at sp = 3) is read whole on every rank.
            last2, state2 = prefill(model, ids[:, :2], CHUNK, mesh=mesh)
            want2, wstate2 = prefill(ref, ids[:, :2], CHUNK)
            close(last2, want2, f"{tag}: 2-token prompt", errors)
            _compare_state(state2, wstate2, f"{tag}: 2-token prompt", errors)
            n += 1
    return errors, n


def test_sp_chunked_prefill_equals_one_process():
    check_results(run_world(_world, 3))
