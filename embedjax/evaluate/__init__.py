"""Evaluation: one ``Evaluator.run(encode_fn) -> dict[str, float]`` interface for STS and BEIR retrieval.

``embedjax.evaluate.mteb_adapter`` (needs the optional ``mteb`` package) is not imported here.
"""

from embedjax.evaluate.base import (
    EncodeFn,
    Evaluator,
    encode_fn_from_encoder,
    encode_fn_from_sentence_transformer,
)
from embedjax.evaluate.retrieval import BeirData, BeirFormatError, RetrievalEvaluator, retrieval_metrics
from embedjax.evaluate.sts import STSData, STSEvaluator, STSFormatError, read_stsb

__all__ = [
    "BeirData",
    "BeirFormatError",
    "EncodeFn",
    "Evaluator",
    "RetrievalEvaluator",
    "STSData",
    "STSEvaluator",
    "STSFormatError",
    "encode_fn_from_encoder",
    "encode_fn_from_sentence_transformer",
    "read_stsb",
    "retrieval_metrics",
]
