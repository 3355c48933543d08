"""Loading a pretrained checkpoint onto a mesh that spans several hosts (2 processes x 4 devices, fsdp=8): each
process reads from the safetensors file only the slices its own devices hold (every `LazyWeight.read` recorded),
the arrays it holds equal the file's, and no device holds a whole sharded weight."""
import json

import pytest

from _processes import logs, start_python, wait_all

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

CHILD = r'''
import json, sys
import numpy as np
from embedjax.models import convert

reads = []
_read = convert.LazyWeight.read

def read(self, index=None):
    out = _read(self, index)
    reads.append(out.size)
    return out

convert.LazyWeight.read = read

from embedjax import sharding
from embedjax.config import load_config
from embedjax.experiment import assemble
from embedjax.models.source import resolve

cfg = load_config("configs/tiny.py", [f"init_from='{sys.argv[1]}'", "mesh.data=1", "mesh.fsdp=8"])
cfg.model_config = {}
src = resolve(cfg)
exp = assemble(cfg, sharding.make_mesh(dict(cfg.mesh)))
state, _ = exp.create_state(src.config, jax.random.key(0), pretrained=src.params)
eager = convert.load_folder(sys.argv[1])[1]
held, total, mismatched, whole = 0, 0, [], []
flat = jax.tree_util.tree_flatten_with_path(state.params["model"])[0]
for (path, arr), want in zip(flat, jax.tree.leaves(eager)):
    total += want.size
    name = jax.tree_util.keystr(path)
    if not arr.sharding.is_fully_replicated and any(s.data.size == arr.size for s in arr.addressable_shards):
        whole.append(name)
    for s in arr.addressable_shards:
        if not np.array_equal(np.asarray(s.data), want[s.index]):
            mismatched.append(name)
    held += sum({tuple((sl.start, sl.stop) for sl in s.index): s.data.size
                 for s in arr.addressable_shards}.values())   # this host's distinct slices
json.dump({"read": int(sum(reads)), "held": int(held), "total": int(total), "mismatched": mismatched,
           "whole": whole, "local_devices": jax.local_device_count()},
          open(f"{sys.argv[2]}/process{PROCESS_ID}.json", "w"))
'''


def test_each_host_reads_only_its_devices_slices(tmp_path, tiny_bert_dir):
    procs = start_python(2, CHILD, devices_per_process=4, logdir=tmp_path / "logs",
                         args=[str(tiny_bert_dir), str(tmp_path)])
    assert wait_all(procs, 600) == [0, 0], logs(procs)
    out = [json.loads((tmp_path / f"process{i}.json").read_text()) for i in range(2)]
    for o in out:
        assert o["local_devices"] == 4 and not o["mismatched"] and not o["whole"], o
        # what a host reads is exactly the distinct slices its devices hold: about half of the weights (the
        # norm vectors, replicated, are read whole by both), never the whole checkpoint
        assert o["read"] == o["held"], o
        assert o["read"] < 0.6 * o["total"], o
    assert out[0]["read"] + out[1]["read"] >= out[0]["total"]
