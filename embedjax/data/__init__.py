"""Input pipeline: local files -> TFDS -> seqio tasks (prompts, the model's tokenizer) -> fixed-shape batches.

Modules (import the one you need; only `tasks`, `tfds_builders` and `tf_tokenize` import TensorFlow):

* `sources`: readers for pairs / triplets (JSONL, TSV), scored pairs (STS-B), BEIR folders; `DataError`.
* `prompts`: Gecko / E5 / INSTRUCTOR-style prompt templates, in Python and TF.
* `tf_tokenize`: the model's WordPiece / SentencePiece tokenizer as a seqio Vocabulary and a ``tf.Module``
  (same ids as its Hugging Face tokenizer); reused by the SavedModel export.
* `tfds_builders`: TFDS datasets built from local files, no network.
* `tasks`: seqio Tasks / Mixtures, host sharding by text groups, `build_iterator`.
* `pipeline`: bucketed padding, the deduplicating resumable batch iterator, `make_global_batch` (numpy + jax).
* `mining`: hard-negative mining and the ``embedjax mine`` subcommand.

Shipped data (SciFact, STS-B; licences in ``shipped/PROVENANCE.md``): `sources.shipped_path`.
"""
