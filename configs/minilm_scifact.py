"""Fine-tune all-MiniLM-L6-v2 on the shipped SciFact train pairs (in-batch softmax, negatives gathered across
4 simulated devices, parameters sharded over them), evaluating SciFact test nDCG@10 before and after. The
README's main job, sized for a 2-core CPU (about 12 minutes there, installation included):

    embedjax train --config configs/minilm_scifact.py --workdir runs/minilm_scifact --fake-devices 4

The model reads 128 tokens (`model_config.max_length`; all-MiniLM-L6-v2 was published at 256, where SciFact
nDCG@10 is 64.51 as MTEB reports): training and both evaluations at 128 cost about half as much, and the
fine-tuned model is saved and exported at 128. The pretrained model's corpus embeddings at 128 tokens ship with
embedjax (embedjax/data/shipped/corpus_embeddings), so the evaluation before training reads them back.
Result: see README. Variants: `:tiny` (a few steps, for tests).
"""
from embedjax.config import base_config
from embedjax.data.sources import shipped_path


def get_config(arg=None):
    c = base_config()
    c.init_from = "sentence-transformers/all-MiniLM-L6-v2"
    c.model_config.max_length = 128
    c.max_query_length = 64
    c.max_document_length = 128
    c.data.kind = "beir"
    c.data.path = str(shipped_path("scifact"))
    c.data.split = "train"
    c.batch_size = 32
    c.grad_cache_chunks = 2           # the same gradients, half the activations: peak memory 4.4 -> 3.1 GiB
    c.num_steps = 40                  # ~1.4 epochs of the 919 train pairs
    c.loss.name = "in_batch_softmax"
    c.loss.temperature = 0.05
    c.loss.bidirectional = True
    c.optim.lr = 5e-5
    c.optim.warmup_steps = 6
    c.optim.weight_decay = 0.01
    c.eval.tasks = (f"beir:{shipped_path('scifact')}:test",)
    c.mesh.data, c.mesh.fsdp = 1, -1  # batch and parameters split over the same devices (less memory)
    c.log_every_steps = 5
    if arg == "tiny":
        c.num_steps = 3
        c.batch_size = 8
        c.max_document_length = 64
        c.eval.tasks = ()
    return c
