"""`embedjax export`: a TF Serving SavedModel (default) or a sentence-transformers folder, from a training
workdir or a model folder.

    embedjax export --workdir /runs/tiny --output /models/tiny/1
    embedjax export --model all-MiniLM-L6-v2/ --output /models/minilm/1 --platforms cpu,cuda
    embedjax export --workdir /runs/tiny --output /models/tiny-st --format sentence-transformers
"""
from __future__ import annotations

import argparse
from pathlib import Path


def _int_list(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _str_list(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="write a TF Serving SavedModel or a sentence-transformers folder",
        description="Export a trained workdir (latest checkpoint, or --step) or a model folder as a TF "
                    "Serving SavedModel (strings in, embeddings out; tokenizer in the graph) or a "
                    "sentence-transformers folder.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training workdir (config.json + checkpoints/ or final/)")
    src.add_argument("--model", help="sentence-transformers / Hugging Face model folder or hub id")
    p.add_argument("--output", required=True,
                   help="SavedModel: BASE/VERSION (TF Serving loads numeric versions: /models/minilm/1); "
                        "sentence-transformers: a folder")
    p.add_argument("--format", choices=("saved_model", "sentence-transformers"), default="saved_model")
    p.add_argument("--step", type=int, default=None, help="checkpoint step to export (default: latest)")
    p.add_argument("--platforms", default="cpu",
                   help="comma-separated jax2tf native-serialization platforms: cpu, cuda, rocm, tpu "
                        "(default cpu)")
    p.add_argument("--max-length", type=int, default=None, help="token limit (default: the model's)")
    p.add_argument("--matryoshka-dims", type=_int_list, default=None,
                   help="extra outputs embedding_{d}, e.g. 256,128 (default: the workdir's "
                        "loss.matryoshka_dims)")
    p.add_argument("--precisions", type=_str_list, default=(),
                   help="extra quantised outputs embedding[_{d}]_{precision}, e.g. ubinary,int8 (int8 / uint8 need "
                        "the model's calibration ranges: embedjax encode --calibrate, Encoder.calibrate)")
    p.add_argument("--layers", type=_int_list, default=None,
                   help="2D Matryoshka: extra signatures layers{n} running the first n layers, e.g. 3 (default: the "
                        "workdir's loss.matryoshka_layers)")
    p.add_argument("--query-prompt", default=None,
                   help="prefix of the 'query' signature (default: the model's)")
    p.add_argument("--document-prompt", default=None,
                   help="prefix of the 'document' signature (default: the model's)")
    p.add_argument("--tokenizer-dir", default=None,
                   help="folder with the tokenizer files (vocab / spiece.model), if not next to the model")
    p.add_argument("--model-name", default="embedjax", help="model name in the warmup requests (TF Serving's "
                                                             "--model_name)")
    p.add_argument("--warmup-batch-sizes", type=_int_list, default=None,
                   help="batch sizes of the warmup requests (default: the batching file's allowed sizes)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run)
    return p


def _require(*modules: str) -> None:
    import importlib

    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError as e:
            from embedjax.errors import CLIError
            raise CLIError(f"'embedjax export' needs {e.name or m}; install the extra: "
                           "pip install 'embedjax[export]'") from None


def run(args: argparse.Namespace) -> int:
    source = args.workdir or args.model
    if args.workdir and not Path(args.workdir).is_dir():
        raise FileNotFoundError(f"--workdir {args.workdir}: no such folder")
    if args.format == "sentence-transformers":
        from embedjax.export.sentence_transformers import export_sentence_transformers

        out = export_sentence_transformers(source, args.output, step=args.step, overwrite=args.overwrite)
        print(f"wrote sentence-transformers folder {out}")
        return 0

    _require("tensorflow", "tensorflow_text", "tensorflow_serving")
    from embedjax.export.saved_model import FROM_MODEL, export_saved_model

    out = export_saved_model(
        source, args.output, platforms=args.platforms, max_length=args.max_length,
        matryoshka_dims=args.matryoshka_dims, precisions=args.precisions, layers=args.layers,
        query_prompt=FROM_MODEL if args.query_prompt is None else args.query_prompt,
        document_prompt=FROM_MODEL if args.document_prompt is None else args.document_prompt,
        tokenizer_dir=args.tokenizer_dir, step=args.step, warmup_batch_sizes=args.warmup_batch_sizes,
        model_name=args.model_name, overwrite=args.overwrite)
    import json

    meta = json.loads((out / "assets.extra" / "embedjax_export.json").read_text(encoding="utf-8"))
    base = out.resolve().parent
    print(f"wrote SavedModel {out}: signatures {', '.join(meta['signatures'])}; outputs "
          f"{', '.join(meta['outputs'])} (dim {meta['embedding_dim']}); {meta['warmup']['records']} warmup "
          f"requests; length buckets {meta['length_buckets']}")
    name = args.model_name
    tf_version = meta["versions"]["tensorflow"]  # the serving image should match the TF (and TF Text) used here
    print("serve it with TF Serving:\n"
          f"  docker run --rm -p 8500:8500 -p 8501:8501 -v {base}:/models/{name} -e MODEL_NAME={name} "
          f"tensorflow/serving:{tf_version} --xla_cpu_compilation_enabled=true --enable_batching "
          f"--batching_parameters_file=/models/{name}/{out.name}/assets.extra/batching_parameters.txt")
    return 0
