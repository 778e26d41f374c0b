"""Zero-shot evaluation: metrics, task definitions, the evaluator."""
