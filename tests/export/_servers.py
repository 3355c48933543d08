"""In-process test doubles of TF Serving's two APIs, built on TF Serving's own protos and
`tf.saved_model.load`.

The real `tensorflow_model_server` binary cannot be installed here; these doubles serve the exported
SavedModel through the same request / response messages (gRPC:
`tensorflow.serving.PredictionService/Predict`; REST: `POST /v1/models/NAME[/versions/V]:predict` with the
row (`instances`) and columnar (`inputs`) JSON formats of https://www.tensorflow.org/tfx/serving/api_rest),
so the client and the SavedModel's signature contract are exercised end to end. Errors map to the status
codes TF Serving uses (NOT_FOUND for an unknown model, INVALID_ARGUMENT for bad inputs / signatures).
"""
from __future__ import annotations

import base64
import json
import re
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
import tensorflow as tf
import tensorflow_text  # noqa: F401 - registers the tokenizer ops of the exported graph
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc


class _Model:
    def __init__(self, path: str):
        self.loaded = tf.saved_model.load(str(path))
        self.lock = threading.Lock()

    def run(self, signature: str, inputs: dict[str, tf.Tensor]) -> dict[str, np.ndarray]:
        if signature not in self.loaded.signatures:
            raise KeyError(f'Serving signature key "{signature}" not found.')
        fn = self.loaded.signatures[signature]
        expected = set(fn.structured_input_signature[1])
        if set(inputs) != expected:
            raise ValueError(f"input keys {sorted(inputs)} do not match the signature's {sorted(expected)}")
        with self.lock:
            out = fn(**inputs)
        return {k: v.numpy() for k, v in out.items()}


class PredictionServiceDouble(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, models: dict[str, _Model]):
        self.models = models

    def Predict(self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext):
        name = request.model_spec.name
        if name not in self.models:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({name})")
        sig = request.model_spec.signature_name or "serving_default"
        try:
            inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
            outputs = self.models[name].run(sig, inputs)
        except (KeyError, ValueError, TypeError, tf.errors.InvalidArgumentError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e).strip("'\""))
        resp = predict_pb2.PredictResponse()
        resp.model_spec.CopyFrom(request.model_spec)
        resp.model_spec.signature_name = sig
        for k, v in outputs.items():
            resp.outputs[k].CopyFrom(tf.make_tensor_proto(v))
        return resp


def start_grpc(models: dict[str, str]) -> tuple[grpc.Server, int]:
    """A gRPC PredictionService on an ephemeral localhost port; returns (server, port)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServiceDouble({k: _Model(v) for k, v in models.items()}), server)
    port = server.add_insecure_port("localhost:0")
    server.start()
    return server, port


_PREDICT = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?:predict$")


def _decode(v):
    if isinstance(v, dict) and set(v) == {"b64"}:
        return base64.b64decode(v["b64"])
    if isinstance(v, str):
        return v.encode("utf-8")
    raise TypeError(f"expected a string, got {type(v).__name__}: {v!r}")


def start_rest(models: dict[str, str]) -> tuple[ThreadingHTTPServer, str]:
    """A TF Serving REST predict endpoint on an ephemeral localhost port; returns (server, base url)."""
    loaded = {k: _Model(v) for k, v in models.items()}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, obj: dict) -> None:
            body = json.dumps(obj).encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):  # noqa: N802 - http.server API
            m = _PREDICT.match(self.path)
            if not m:
                return self._send(404, {"error": f"Malformed request: POST {self.path}"})
            name = m.group(1)
            if name not in loaded:
                return self._send(404, {"error": f"Servable not found for request: Latest({name})"})
            try:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                sig = body.get("signature_name", "serving_default")
                if "instances" in body:
                    inputs = {"text": tf.constant([_decode(v) for v in body["instances"]], tf.string)}
                elif "inputs" in body:
                    inputs = {k: tf.constant([_decode(x) for x in v], tf.string)
                              for k, v in body["inputs"].items()}
                else:
                    raise ValueError("Missing 'inputs' or 'instances' key")
                outputs = loaded[name].run(sig, inputs)
            except (KeyError, ValueError, TypeError, tf.errors.InvalidArgumentError) as e:
                return self._send(400, {"error": str(e).strip("'\"")})
            lists = {k: v.tolist() for k, v in outputs.items()}
            if "instances" in body:
                n = len(next(iter(lists.values())))
                rows = [{k: v[i] for k, v in lists.items()} for i in range(n)]
                if len(lists) == 1:
                    rows = [next(iter(r.values())) for r in rows]
                return self._send(200, {"predictions": rows})
            return self._send(200, {"outputs": lists if len(lists) > 1 else next(iter(lists.values()))})

    server = ThreadingHTTPServer(("localhost", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://localhost:{server.server_address[1]}"
