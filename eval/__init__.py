"""Evaluation: long-context and recall suites on checkpoints and exports (`llm-lru eval`).

    llm-lru eval RUN_DIR|CHECKPOINT|EXPORT_DIR --suite ppl,passkey,niah,lm-eval,task --out DIR [key=value]
    llm-lru eval --sweep configs/sweeps/recall.yaml --out DIR        # the recall lab

Modules (one concept each):
- prefill:  chunked prefill (constant memory per chunk), token log-probs, greedy decoding
- load:     a run dir / checkpoint / export folder -> EvalTarget(model, tokenizer, cfg)
- ppl, passkey, niah, lmeval: the suites; lm_eval_adapter: the lm-evaluation-harness model
- task:     the `task` suite: answer accuracy on a synthetic task (generators: llm_lru.data_prep.tasks)
The recall lab (training through the normal trainer, sweeps) is llm_lru.lab.
- haystack, common, report: prompt assembly, tables/plots/progress, report.json/report.md
"""
