"""Two real processes (jax.distributed on CPU, 4 fake devices each): every process feeds its own batch rows
and `make_global_batch` assembles the global batch on the 8-device mesh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _processes import free_port

REPO = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    from jax.experimental import multihost_utils
    from embedjax.data.pipeline import (BucketFeatureConverter, ContrastiveBatchIterator, TokenizedSet,
                                        batch_sharding, local_batch_size, make_global_batch)
    from embedjax.tokenize import bucket_lengths

    n = 64  # example i: query [i+1, 7, 7], positive [1000+i, ...]; host h holds the examples with i % 2 == h
    mine = [i for i in range(n) if i % 2 == jax.process_index()]
    queries = [[i + 1, 7, 7] for i in mine]
    ts = TokenizedSet.from_lists(mine, queries, [[1000 + i] * (1 + i % 5) for i in mine])
    conv = BucketFeatureConverter(bucket_lengths(16), bucket_lengths(16), task_names=["t"])
    local_bs = local_batch_size(16, jax.process_count())
    it = ContrastiveBatchIterator({"t": ts}, local_bs, converter=conv, seed=0)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(-1, 1), ("data", "model"))
    sharding = batch_sharding(mesh, "data")
    report = {"process_count": jax.process_count(), "devices": len(jax.devices()), "steps": []}
    for step in range(3):
        local = next(it)
        glob = make_global_batch(local, sharding)
        full = multihost_utils.process_allgather(glob["example_idx"], tiled=True)
        report["steps"].append({"local": local["example_idx"].tolist(),
                                "global_shape": list(glob["query_ids"].shape),
                                "global": np.asarray(full).tolist()})
    json.dump(report, open(out, "w"))
""")


@pytest.mark.multiprocess
def test_two_processes_build_one_global_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(port), str(tmp_path / f"out{i}.json")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in (0, 1)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    reports = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in (0, 1)]
    assert reports[0]["process_count"] == 2 and reports[0]["devices"] == 8
    for step in range(3):
        l0, l1 = reports[0]["steps"][step]["local"], reports[1]["steps"][step]["local"]
        assert len(l0) == len(l1) == 8
        assert all(i % 2 == 0 for i in l0) and all(i % 2 == 1 for i in l1)  # each host its own data
        g = reports[0]["steps"][step]["global"]
        assert reports[0]["steps"][step]["global_shape"][0] == 16
        assert g == reports[1]["steps"][step]["global"] == l0 + l1  # process 0's rows, then process 1's
