"""Evaluation: long-context and recall suites on checkpoints and exports (`llm-lru eval`).

    llm-lru eval RUN_DIR|CHECKPOINT|EXPORT_DIR --suite ppl,passkey,niah,lm-eval,task --out DIR [key=value]
    llm-lru eval --sweep configs/sweeps/recall.yaml --out DIR        # the recall lab

Modules (one concept each):
- prefill:  chunked prefill (constant memory per chunk), token log-probs, greedy decoding
- load:     a run dir / checkpoint / export folder -> EvalTarget(model, tokenizer, cfg)
- ppl, passkey, niah, lmeval: the suites; lm_eval_adapter: the lm-evaluation-harness model
- tasks:    synthetic tasks (mqar, s3, s5, selective_copy) registered with the data loader
- recall:   task accuracy, training through the normal trainer, sweeps
- haystack, common, report: prompt assembly, tables/plots/progress, report.json/report.md
"""
