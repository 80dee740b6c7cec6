"""Faithfulness evaluation of a pipeline: metrics, the evaluation run and its report."""
