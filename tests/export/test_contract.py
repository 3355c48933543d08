"""The serving contract without the TF Serving binary (which cannot be installed here): the SignatureDef as
`saved_model_cli` prints it, the warmup file as TF Serving's PredictionLog records, the batching file against
TF Serving's BatchingParameters schema, and gRPC / REST test doubles built on TF Serving's own protos
answering the `embedjax.serving.Client`."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from embedjax.serving import Client, ServingError
from embedjax.tokenize import bucket_lengths

pytest.importorskip("grpc")
from tensorflow_serving.apis import prediction_log_pb2  # noqa: E402

from _servers import start_grpc, start_rest  # noqa: E402

TOL = 1e-4


# ------------------------------------------------------------------------------------------ SignatureDef
def test_saved_model_cli_shows_the_signature(minilm_export):
    cli = Path(sys.executable).with_name("saved_model_cli")
    if not cli.is_file():
        pytest.skip("saved_model_cli not installed next to the Python interpreter")
    out = subprocess.run([str(cli), "show", "--dir", str(minilm_export), "--all"], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    sigs = dict(re.findall(r"signature_def\['(\w+)'\]:\n(.*?)(?=\nsignature_def\[|\Z)", out, re.S))
    assert {"serving_default", "tokenize"} <= set(sigs), out[:2000]
    sd = sigs["serving_default"]
    text = re.search(r"inputs\['text'\] tensor_info:\s+dtype: (\w+)\s+shape: (\S+)", sd)
    assert text and text.groups() == ("DT_STRING", "(-1)"), sd
    emb = re.search(r"outputs\['embedding'\] tensor_info:\s+dtype: (\w+)\s+shape: (\S+ ?\S*)", sd)
    assert emb and emb.group(1) == "DT_FLOAT" and emb.group(2).replace(" ", "") == "(-1,384)", sd
    emb128 = re.search(r"outputs\['embedding_128'\] tensor_info:\s+dtype: (\w+)\s+shape: (\S+ ?\S*)", sd)
    assert emb128 and emb128.group(2).replace(" ", "") == "(-1,128)", sd
    assert "Method name is: tensorflow/serving/predict" in sd


# ------------------------------------------------------------------------------------------------ warmup
def _warmup_records(export: Path) -> list:
    path = export / "assets.extra" / "tf_serving_warmup_requests"
    return [prediction_log_pb2.PredictionLog.FromString(r.numpy())
            for r in tf.data.TFRecordDataset(str(path))]


def test_warmup_file_is_prediction_log_records_covering_every_shape(minilm_export, minilm_sm):
    records = _warmup_records(minilm_export)
    buckets = bucket_lengths(256)
    sizes = (1, 8, 32, 128)
    assert len(records) == len(buckets) * len(sizes)  # one signature (serving_default) x buckets x sizes
    seen = set()
    for rec in records:
        assert rec.WhichOneof("log_type") == "predict_log"
        req = rec.predict_log.request
        assert req.model_spec.name == "minilm" and req.model_spec.signature_name == "serving_default"
        assert list(req.inputs) == ["text"]
        t = req.inputs["text"]
        assert t.dtype == tf.string.as_datatype_enum
        texts = tf.make_ndarray(t)
        assert [d.size for d in t.tensor_shape.dim] == [len(texts)]
        ids, _ = minilm_sm.tokenize([texts[0].decode()])
        seen.add((len(texts), ids.shape[1]))
    assert seen == {(s, b) for s in sizes for b in buckets}


def test_warmup_requests_replay_through_the_model(tiny_export, tiny_sm):
    """What TF Serving does at load: run every warmup request; each must answer [batch, D] for each output."""
    records = _warmup_records(tiny_export)
    assert len(records) == 3 * len(bucket_lengths(128)) * 2  # 3 signatures x 6 buckets x sizes (1, 8)
    for rec in records:
        req = rec.predict_log.request
        fn = tiny_sm.model.signatures[req.model_spec.signature_name]
        out = fn(text=tf.constant(tf.make_ndarray(req.inputs["text"])))
        n = req.inputs["text"].tensor_shape.dim[0].size
        assert {k: tuple(v.shape) for k, v in out.items()} == {
            "embedding": (n, 32), "embedding_16": (n, 16), "embedding_8": (n, 8)}
        assert all(np.isfinite(v.numpy()).all() for v in out.values())


# ---------------------------------------------------------------------------------------------- batching
def _batching_parameters_class():
    """tensorflow.serving.BatchingParameters, fields as in TF Serving's
    tensorflow_serving/servables/tensorflow/session_bundle_config.proto (the pip package ships no Python
    module for it), built with protobuf's descriptor API so text_format checks the file against the
    schema."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="tfs_session_bundle_config_subset.proto",
                                             package="tensorflow.serving", syntax="proto3",
                                             dependency=["google/protobuf/wrappers.proto"])
    msg = fdp.message_type.add(name="BatchingParameters")
    for num, name, kind in [(1, "max_batch_size", ".google.protobuf.Int64Value"),
                            (2, "batch_timeout_micros", ".google.protobuf.Int64Value"),
                            (3, "max_enqueued_batches", ".google.protobuf.Int64Value"),
                            (4, "num_batch_threads", ".google.protobuf.Int64Value"),
                            (5, "thread_pool_name", ".google.protobuf.StringValue")]:
        msg.field.add(name=name, number=num, type=F.TYPE_MESSAGE, type_name=kind, label=F.LABEL_OPTIONAL)
    msg.field.add(name="allowed_batch_sizes", number=6, type=F.TYPE_INT64, label=F.LABEL_REPEATED)
    msg.field.add(name="pad_variable_length_inputs", number=7, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(fdp)
    desc = pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters")
    return message_factory.GetMessageClass(desc)


def test_batching_file_parses_as_batching_parameters(minilm_export):
    from google.protobuf import text_format

    params = text_format.Parse((minilm_export / "assets.extra" / "batching_parameters.txt").read_text(),
                               _batching_parameters_class()())
    sizes = list(params.allowed_batch_sizes)
    # TF Serving's rules: increasing sizes, the last one equal to max_batch_size
    assert sizes == sorted(set(sizes)) and sizes[-1] == params.max_batch_size.value == 128
    assert params.num_batch_threads.value >= 1 and params.batch_timeout_micros.value > 0
    warm = {tf.make_ndarray(r.predict_log.request.inputs["text"]).shape[0]
            for r in _warmup_records(minilm_export)}
    assert warm == set(sizes)  # every padded batch size is compiled before traffic


def test_batching_parameters_are_validated():
    from embedjax.export.saved_model import BatchingParameters

    with pytest.raises(ValueError, match="must equal max_batch_size"):
        BatchingParameters(max_batch_size=64, allowed_batch_sizes=(8, 32))
    with pytest.raises(ValueError, match="increasing"):
        BatchingParameters(max_batch_size=8, allowed_batch_sizes=(8, 1, 8))


# ------------------------------------------------------------------------------------------ the doubles
@pytest.fixture(scope="module")
def grpc_target(minilm_export, tiny_export):
    server, port = start_grpc({"minilm": minilm_export, "tiny": tiny_export})
    yield f"localhost:{port}"
    server.stop(0)


@pytest.fixture(scope="module")
def rest_url(minilm_export, tiny_export):
    server, url = start_rest({"minilm": minilm_export, "tiny": tiny_export})
    yield url
    server.shutdown()


TEXTS = ["A plane is taking off.", "A man is playing a flute.", "", "naïve café — 日本語",
         "A woman is slicing an onion into very thin rings for the soup she is making tonight."]


@pytest.mark.parametrize("protocol", ["grpc", "rest-inputs", "rest-instances"])
def test_client_gets_the_models_embeddings(protocol, grpc_target, rest_url, minilm, minilm_sm):
    target = grpc_target if protocol == "grpc" else rest_url
    fmt = "instances" if protocol == "rest-instances" else "inputs"
    with Client(target, model_name="minilm", rest_format=fmt) as client:
        got = client.embed(TEXTS, batch_size=2)
        np.testing.assert_allclose(got, minilm_sm.encode(TEXTS), atol=1e-6, rtol=0)
        np.testing.assert_allclose(got, minilm.encode(TEXTS), atol=TOL, rtol=0)
        np.testing.assert_allclose(client.embed(TEXTS, dim=128), minilm.encode(TEXTS, dim=128),
                                   atol=TOL, rtol=0)
        assert client.embed([]).shape == (0, 384)
        raw = client.embed([b"caf\xc3 au lait \xff"])  # bytes go as-is (gRPC) or base64 (REST)
        np.testing.assert_allclose(raw, minilm.encode(["caf\ufffd au lait \ufffd"]), atol=TOL, rtol=0)


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_client_role_signatures(protocol, grpc_target, rest_url, tiny_enc):
    client = Client(grpc_target if protocol == "grpc" else rest_url, model_name="tiny")
    q = client.embed(TEXTS, signature="query")
    np.testing.assert_allclose(q, tiny_enc.encode(TEXTS, prompt="query: "), atol=TOL, rtol=0)
    d = Client(grpc_target if protocol == "grpc" else rest_url, model_name="tiny", signature="document")
    np.testing.assert_allclose(d.embed(TEXTS, dim=8), tiny_enc.encode(TEXTS, prompt="passage: ", dim=8),
                               atol=TOL, rtol=0)


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_client_errors_are_clear(protocol, grpc_target, rest_url):
    target = grpc_target if protocol == "grpc" else rest_url
    with pytest.raises(ServingError, match="NOT_FOUND|HTTP 404"):
        Client(target, model_name="nope").embed(["x"])
    with pytest.raises(ServingError, match=r"INVALID_ARGUMENT|HTTP 400.*not found"):
        Client(target, model_name="minilm").embed(["x"], signature="nope")
    with pytest.raises(ServingError, match="no output 'embedding_7'"):
        Client(target, model_name="minilm").embed(["x"], dim=7)
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        Client(target, model_name="minilm").embed(["x", 3])


def test_client_rejects_bad_targets():
    with pytest.raises(ValueError, match="host:port"):
        Client("localhost")
    with pytest.raises(ServingError, match="cannot connect"):
        Client("http://127.0.0.1:9", timeout=5).embed(["x"])
