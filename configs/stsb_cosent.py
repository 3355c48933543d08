"""Fine-tune all-MiniLM-L6-v2 on STS-B train with CoSENT, evaluating STS-B test Spearman before and after.

    embedjax train --config configs/stsb_cosent.py --workdir runs/stsb_cosent --fake-devices 8

Result (2-core CPU, 8 fake devices): STS-B test Spearman x100 82.03 -> see README (target >= 84.5).
"""
from embedjax.config import base_config
from embedjax.data.sources import shipped_path


def get_config(arg=None):
    c = base_config()
    c.init_from = "sentence-transformers/all-MiniLM-L6-v2"
    c.max_query_length = 96
    c.max_document_length = 96
    c.data.kind = "stsb"
    c.data.path = str(shipped_path("stsb", "train.tsv"))
    c.batch_size = 32
    c.num_steps = 360                 # ~2 epochs of 5749 pairs
    c.loss.name = "cosent"
    c.loss.scale = 20.0
    c.optim.lr = 2e-5
    c.optim.warmup_steps = 36
    c.eval.tasks = (f"stsb:{shipped_path('stsb')}:test",)
    c.log_every_steps = 20
    if arg == "tiny":
        c.num_steps = 3
        c.eval.tasks = ()
    return c
