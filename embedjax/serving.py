"""A small client for an embedjax SavedModel behind TF Serving (`embedjax export`), over REST or gRPC.

    from embedjax.serving import Client
    Client("http://localhost:8501", model_name="minilm").embed(["a sentence", "another"])   # REST
    Client("localhost:8500", model_name="minilm").embed(["a sentence"], signature="query")  # gRPC

REST: ``POST {url}/v1/models/{name}[/versions/{v}]:predict`` with the columnar body
``{"signature_name": ..., "inputs": {"text": [...]}}`` (default) or the row body ``{"instances": [...]}``
(``rest_format="instances"``); binary strings go as ``{"b64": ...}``. gRPC: ``PredictionService/Predict`` with
TF Serving's own protos (``tensorflow-serving-api``). Long lists are sent in requests of `batch_size` texts.
"""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Sequence

import numpy as np

INPUT_NAME = "text"
OUTPUT_NAME = "embedding"


class ServingError(RuntimeError):
    """The server refused or failed a request; the message carries the server's own error text."""


class Client:
    """Embeds texts with a model served by TF Serving.

    `target`: ``http(s)://host:port`` (REST) or ``host:port`` / ``grpc://host:port`` (gRPC).
    """

    def __init__(self, target: str, *, model_name: str = "embedjax", version: int | None = None,
                 signature: str = "serving_default", timeout: float = 60.0, rest_format: str = "inputs",
                 max_message_bytes: int = 256 << 20):
        if rest_format not in ("inputs", "instances"):
            raise ValueError(f"rest_format must be 'inputs' or 'instances', got {rest_format!r}")
        self.model_name = model_name
        self.version = version
        self.signature = signature
        self.timeout = float(timeout)
        self.rest_format = rest_format
        self._dims: dict[tuple[str, str], int] = {}
        self._channel = None
        self._stub = None
        if target.startswith(("http://", "https://")):
            self.protocol = "rest"
            self.url = target.rstrip("/")
        else:
            self.protocol = "grpc"
            self.url = target.removeprefix("grpc://").rstrip("/")
            if ":" not in self.url:
                raise ValueError(f"gRPC target {target!r}: expected host:port (e.g. localhost:8500)")
            import grpc
            from tensorflow_serving.apis import prediction_service_pb2_grpc

            self._channel = grpc.insecure_channel(self.url, options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes)])
            self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    # ----------------------------------------------------------------------------------------------- public
    def embed(self, texts: str | Sequence[str | bytes], *, batch_size: int = 128, dim: int | None = None,
              output: str | None = None, signature: str | None = None,
              sort_by_length: bool = True) -> np.ndarray:
        """float32 [N, D]: the `output` (default ``embedding``, or ``embedding_{dim}``) of `signature`.

        Requests carry `batch_size` texts; with `sort_by_length` they group texts of similar length (the
        server pads a request to the length bucket of its longest text). Rows come back in input order."""
        if isinstance(texts, (str, bytes)):
            texts = [texts]
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, (str, bytes)):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        sig = signature or self.signature
        key = output or (f"{OUTPUT_NAME}_{dim}" if dim else OUTPUT_NAME)
        if not texts:  # one tiny request learns D, so an empty input still gives a [0, D] array
            if (sig, key) not in self._dims:
                self._dims[(sig, key)] = self._pick(self.predict([""], signature=sig), key).shape[1]
            return np.zeros((0, self._dims[(sig, key)]), np.float32)
        if sort_by_length:
            order = np.argsort(-np.fromiter((len(t) for t in texts), np.int64, len(texts)), kind="stable")
        else:
            order = np.arange(len(texts))
        out: np.ndarray | None = None
        for s in range(0, len(texts), batch_size):
            idx = order[s:s + batch_size]
            emb = self._pick(self.predict([texts[i] for i in idx], signature=sig), key)
            if emb.ndim != 2 or emb.shape[0] != len(idx):
                raise ServingError(f"{self.url}: expected {len(idx)} embeddings, got shape {emb.shape}")
            if out is None:
                out = np.empty((len(texts), emb.shape[1]), np.float32)
            out[idx] = emb
        self._dims[(sig, key)] = out.shape[1]
        return out

    def predict(self, texts: Sequence[str | bytes], *, signature: str | None = None) -> dict[str, np.ndarray]:
        """One Predict request; returns every output of the signature as numpy arrays."""
        sig = signature or self.signature
        if self.protocol == "grpc":
            return self._predict_grpc(list(texts), sig)
        return self._predict_rest(list(texts), sig)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.protocol} {self.url}, model={self.model_name}, signature={self.signature})"

    # ------------------------------------------------------------------------------------------ protocols
    def _pick(self, outputs: dict[str, np.ndarray], key: str) -> np.ndarray:
        if key not in outputs:
            raise ServingError(f"{self.url}: model {self.model_name!r} has no output {key!r}; "
                               f"it returns {sorted(outputs)}")
        return np.asarray(outputs[key], np.float32)

    @property
    def predict_url(self) -> str:
        if "/v1/models/" in self.url:
            base = self.url.removesuffix(":predict")
        else:
            base = f"{self.url}/v1/models/{urllib.parse.quote(self.model_name)}"
            if self.version is not None:
                base += f"/versions/{int(self.version)}"
        return base + ":predict"

    def _predict_rest(self, texts: list[str | bytes], signature: str) -> dict[str, np.ndarray]:
        values = [{"b64": base64.b64encode(t).decode("ascii")} if isinstance(t, bytes) else t for t in texts]
        body: dict[str, Any] = {"signature_name": signature}
        if self.rest_format == "inputs":
            body["inputs"] = {INPUT_NAME: values}
        else:
            body["instances"] = values
        req = urllib.request.Request(self.predict_url, data=json.dumps(body).encode("utf-8"), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                payload = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            raw = e.read().decode("utf-8", "replace")
            try:
                msg = json.loads(raw).get("error", raw)
            except (json.JSONDecodeError, AttributeError):
                msg = raw
            raise ServingError(f"{self.predict_url}: HTTP {e.code}: {msg}") from None
        except urllib.error.URLError as e:
            raise ServingError(f"{self.predict_url}: cannot connect ({e.reason})") from None
        if "error" in payload:
            raise ServingError(f"{self.predict_url}: {payload['error']}")
        if "outputs" in payload:                      # columnar response
            outs = payload["outputs"]
            if not isinstance(outs, dict):            # a single-output signature returns the tensor itself
                outs = {OUTPUT_NAME: outs}
            return {k: np.asarray(v, np.float32) for k, v in outs.items()}
        if "predictions" in payload:                  # row response
            rows = payload["predictions"]
            if rows and isinstance(rows[0], dict):
                return {k: np.asarray([r[k] for r in rows], np.float32) for k in rows[0]}
            return {OUTPUT_NAME: np.asarray(rows, np.float32).reshape(len(rows), -1)}
        raise ServingError(f"{self.predict_url}: unexpected response keys {sorted(payload)}")

    def _predict_grpc(self, texts: list[str | bytes], signature: str) -> dict[str, np.ndarray]:
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import model_pb2, predict_pb2

        spec = model_pb2.ModelSpec(name=self.model_name, signature_name=signature)
        if self.version is not None:
            spec.version.value = int(self.version)
        req = predict_pb2.PredictRequest(model_spec=spec)
        data = np.array([t.encode("utf-8") if isinstance(t, str) else t for t in texts], dtype=object)
        req.inputs[INPUT_NAME].CopyFrom(tf.make_tensor_proto(data, dtype=tf.string, shape=[len(texts)]))
        try:
            resp = self._stub.Predict(req, timeout=self.timeout)
        except grpc.RpcError as e:
            raise ServingError(f"{self.url}: {e.code().name}: {e.details()}") from None
        return {k: tf.make_ndarray(v) for k, v in resp.outputs.items()}
