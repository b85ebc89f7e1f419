"""Triton's `inference.GRPCInferenceService` over ftjax, with FasterTransformer's tensor names.

Implemented: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig,
ModelInfer, ModelStreamInfer, ModelStatistics, RepositoryIndex. The rest answer UNIMPLEMENTED
(the generated servicer base class does that).

    server = Server([Model(name, llm, spec)], host="127.0.0.1", grpc_port=0, metrics_port=0).start()
    ... server.grpc_port ...
    server.stop()
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time

import grpc
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg

import ftjax
from ftjax.serve import repository, tensors
from ftjax.serve.metrics import Metrics, MetricsServer
from ftjax.serve.scheduler import QueueFull, Request, Scheduler, Update

log = logging.getLogger("ftjax.serve")

_CODES = {"cancelled": grpc.StatusCode.CANCELLED, "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
          "invalid": grpc.StatusCode.INVALID_ARGUMENT, "internal": grpc.StatusCode.INTERNAL,
          "unavailable": grpc.StatusCode.UNAVAILABLE}


@dataclasses.dataclass
class Model:
    name: str
    llm: object
    config: mc.ModelConfig
    max_request_batch: int = 0
    decoupled: bool = True
    scheduler: Scheduler | None = None
    # statistics
    n_success: int = 0
    n_fail: int = 0
    ns_success: int = 0
    ns_fail: int = 0
    ns_queue: int = 0
    n_inferences: int = 0
    last_ms: int = 0


def make_params(llm, kw_rows: list[dict]):
    """One dict of SamplingParams keywords per row -> verified SamplingParams with model defaults."""
    from ftjax.sampling import SamplingParams

    return llm.sampling_params(len(kw_rows), params=[SamplingParams(**kw) for kw in kw_rows])


class Service(pbg.GRPCInferenceServiceServicer):
    def __init__(self, models: dict[str, Model], metrics: Metrics, request_timeout: float | None):
        self.models = models
        self.metrics = metrics
        self.request_timeout = request_timeout

    # ------------------------------------------------------------------------------ health / info
    def ServerLive(self, request, context):  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=all(self._ready(m) for m in self.models.values()))

    def _ready(self, m: Model) -> bool:
        return m.scheduler is not None and m.scheduler.ready.is_set() and m.scheduler.error is None

    def _model(self, name, version, context) -> Model:
        m = self.models.get(name)
        if m is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {name!r} not found; serving: {', '.join(self.models)}")
        if version not in ("", "1"):
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {name!r} has no version {version!r} (only 1)")
        return m

    def ModelReady(self, request, context):  # noqa: N802
        m = self.models.get(request.name)
        return pb.ModelReadyResponse(ready=m is not None and request.version in ("", "1") and self._ready(m))

    def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(name="ftjax", version=ftjax.__version__,
                                         extensions=["classification", "model_configuration", "statistics"])

    def ModelMetadata(self, request, context):  # noqa: N802
        m = self._model(request.name, request.version, context)
        r = pb.ModelMetadataResponse(name=m.name, versions=["1"], platform="fastertransformer")
        batch = [-1] if m.config.max_batch_size > 0 else []
        for t in m.config.input:
            r.inputs.add(name=t.name, datatype=_dt(t.data_type), shape=batch + list(t.dims))
        for t in m.config.output:
            r.outputs.add(name=t.name, datatype=_dt(t.data_type), shape=batch + list(t.dims))
        return r

    def ModelConfig(self, request, context):  # noqa: N802
        m = self._model(request.name, request.version, context)
        return pb.ModelConfigResponse(config=m.config)

    def RepositoryIndex(self, request, context):  # noqa: N802
        r = pb.RepositoryIndexResponse()
        for m in self.models.values():
            if request.ready and not self._ready(m):
                continue
            r.models.add(name=m.name, version="1", state="READY" if self._ready(m) else "UNAVAILABLE")
        return r

    def ModelStatistics(self, request, context):  # noqa: N802
        names = [request.name] if request.name else list(self.models)
        r = pb.ModelStatisticsResponse()
        for n in names:
            m = self._model(n, request.version, context)
            s = r.model_stats.add(name=m.name, version="1", last_inference=m.last_ms,
                                  inference_count=m.n_inferences, execution_count=m.n_success)
            s.inference_stats.success.count = m.n_success
            s.inference_stats.success.ns = m.ns_success
            s.inference_stats.fail.count = m.n_fail
            s.inference_stats.fail.ns = m.ns_fail
            s.inference_stats.queue.count = m.n_success
            s.inference_stats.queue.ns = m.ns_queue
        return r

    # ------------------------------------------------------------------------------ inference
    def _make_request(self, m: Model, request, *, stream: bool, on_update=None) -> Request:
        """ModelInferRequest -> scheduler Request (raises TensorError)."""
        arrays = tensors.decode_inputs(request)
        datatypes = {t.name: t.datatype for t in request.inputs}
        parse = tensors.parse_t5 if _is_t5(m) else tensors.parse_gpt
        rows = parse(
            arrays, datatypes, make_params=lambda kw: make_params(m.llm, kw),
            check_prompt=m.llm.engine.check_prompt, max_request_batch=m.max_request_batch)
        want_lp = any(r.params.return_log_probs for r in rows)
        timeout = self.request_timeout
        if "timeout" in request.parameters:  # Triton's per-request timeout, microseconds
            us = request.parameters["timeout"].int64_param
            if us > 0:
                timeout = us / 1e6 if not timeout else min(timeout, us / 1e6)
        req = Request(rows, stream=stream, timeout=timeout, on_update=on_update, want_logprobs=want_lp)
        req.model = m
        req.request_id = request.id
        req.requested = {o.name for o in request.outputs}
        return req

    def _response(self, req: Request, beams, logprobs, final: bool | None) -> pb.ModelInferResponse:
        r = pb.ModelInferResponse(model_name=req.model.name, model_version="1", id=req.request_id)
        tensors.gpt_outputs(r, beams, logprobs, req.requested, "INT32" if _is_t5(req.model) else "UINT32")
        if final is not None:
            r.parameters["triton_final_response"].bool_param = final
        return r

    def _record(self, req: Request, ok: bool):
        m = req.model
        now = time.monotonic()
        ns = int((now - req.t_arrival) * 1e9)
        if ok:
            m.n_success += 1
            m.ns_success += ns
            m.n_inferences += len(req.rows)
            if req.t_admitted is not None:
                m.ns_queue += int((req.t_admitted - req.t_arrival) * 1e9)
        else:
            m.n_fail += 1
            m.ns_fail += ns
        m.last_ms = int(time.time() * 1000)

    def ModelInfer(self, request, context):  # noqa: N802
        m = self._model(request.model_name, request.model_version, context)
        try:
            req = self._make_request(m, request, stream=False)
        except ValueError as e:
            m.n_fail += 1
            self.metrics.failed(m.name)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        context.add_callback(req.cancel)
        try:
            m.scheduler.submit(req)
        except QueueFull as e:
            m.n_fail += 1
            self.metrics.failed(m.name)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        while True:
            try:
                u = req.get(timeout=0.25)
            except queue.Empty:
                if not context.is_active():
                    req.cancel()
                    m.scheduler.wake()
                continue
            if u.kind == "done":
                self._record(req, True)
                return self._response(req, u.seqs, u.logprobs, None)
            if u.kind == "error":
                self._record(req, False)
                context.abort(_CODES.get(u.code, grpc.StatusCode.INTERNAL), u.message)

    def ModelStreamInfer(self, request_iterator, context):  # noqa: N802
        out: queue.Queue = queue.Queue()
        pending = set()
        lock = threading.Lock()
        reader_done = threading.Event()
        reqs: list[Request] = []

        def cancel_all():
            for r in list(reqs):
                r.cancel()
            for m in self.models.values():
                if m.scheduler:
                    m.scheduler.wake()

        context.add_callback(cancel_all)

        def on_update(req, u: Update):
            out.put((req, u))

        def reader():
            try:
                for request in request_iterator:
                    m = self.models.get(request.model_name)
                    if m is None:
                        out.put((None, f"model {request.model_name!r} not found; serving: {', '.join(self.models)}"))
                        continue
                    try:
                        holder = {}
                        req = self._make_request(m, request, stream=True,
                                                 on_update=lambda u, h=holder: on_update(h["r"], u))
                        holder["r"] = req
                        req.decoupled = m.decoupled
                        with lock:
                            pending.add(req)
                        reqs.append(req)
                        m.scheduler.submit(req)
                    except (ValueError, QueueFull) as e:
                        m.n_fail += 1
                        self.metrics.failed(m.name)
                        with lock:
                            pending.discard(holder.get("r"))
                        out.put((None, str(e)))
            except Exception as e:  # noqa: BLE001 - stream broken by the client
                log.debug("stream reader ended: %s", e)
                cancel_all()
            finally:
                reader_done.set()
                out.put(None)

        threading.Thread(target=reader, name="ftjax-stream-reader", daemon=True).start()
        while True:
            with lock:
                if reader_done.is_set() and not pending and out.empty():
                    return
            try:
                item = out.get(timeout=0.25)
            except queue.Empty:
                if not context.is_active():
                    cancel_all()
                    return
                continue
            if item is None:
                continue
            req, u = item
            if req is None:
                yield pb.ModelStreamInferResponse(error_message=u)
                continue
            if u.kind == "token":
                if getattr(req, "decoupled", True):
                    yield pb.ModelStreamInferResponse(
                        infer_response=self._response(req, [[s] for s in u.seqs], None, False))
                continue
            with lock:
                pending.discard(req)
            if u.kind == "done":
                self._record(req, True)
                yield pb.ModelStreamInferResponse(infer_response=self._response(req, u.seqs, u.logprobs, True))
            else:
                self._record(req, False)
                yield pb.ModelStreamInferResponse(error_message=f"[{u.code}] {u.message}")


def _is_t5(m) -> bool:
    return getattr(m.llm.cfg, "arch", "gpt") == "t5"


def _dt(t: int) -> str:
    s = mc.DataType.Name(t).replace("TYPE_", "")
    return "BYTES" if s == "STRING" else s


class Server:
    def __init__(self, models: list[Model], *, host: str = "127.0.0.1", grpc_port: int = 8001,
                 metrics_port: int | None = 8002, max_queue: int = 1024, request_timeout: float | None = None,
                 chunk: int = 8, stream_chunk: int = 1, max_workers: int = 256):
        self.metrics = Metrics()
        self.models = {m.name: m for m in models}
        for m in models:
            m.scheduler = Scheduler(m.llm, max_queue=max_queue, chunk=chunk, stream_chunk=stream_chunk,
                                    metrics=self.metrics, model_name=m.name)
            self.metrics.waiting_fn[m.name] = (lambda s=m.scheduler: s.waiting)
        self.service = Service(self.models, self.metrics, request_timeout)
        self.grpc = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=max_workers),
                                options=[("grpc.max_send_message_length", -1),
                                         ("grpc.max_receive_message_length", -1)])
        pbg.add_GRPCInferenceServiceServicer_to_server(self.service, self.grpc)
        self.grpc_port = self.grpc.add_insecure_port(f"{host}:{grpc_port}")
        if self.grpc_port == 0:
            raise OSError(f"cannot bind gRPC to {host}:{grpc_port}")
        self.metrics_server = MetricsServer(self.metrics, host, metrics_port) if metrics_port is not None else None
        self.metrics_port = self.metrics_server.port if self.metrics_server else None
        self.host = host

    def start(self, wait_ready: float = 600.0):
        for m in self.models.values():
            m.scheduler.start()
        for m in self.models.values():
            m.scheduler.ready.wait(wait_ready)
            if m.scheduler.error is not None:
                raise RuntimeError(f"model {m.name}: engine failed to start: {m.scheduler.error}")
        self.grpc.start()
        if self.metrics_server:
            self.metrics_server.start()
        return self

    def stop(self, grace: float = 1.0):
        self.grpc.stop(grace)
        for m in self.models.values():
            m.scheduler.stop()
        if self.metrics_server:
            self.metrics_server.stop()

    def wait(self):
        self.grpc.wait_for_termination()


def load_models(*, model: str | None = None, model_repository: str | None = None, dtype: str | None = None,
                max_batch_size: int | None = None, max_seq_len: int | None = None, tensor_parallel: int = 1,
                pipeline_parallel: int = 1, quantize: str | None = None, attention: str = "auto") -> list[Model]:
    """The models a server serves: a repository, one checkpoint, or the embedded default."""
    if model and model_repository:
        raise ValueError("--model and --model-repository are exclusive")
    if model_repository:
        specs = repository.load_repository(model_repository)
    else:
        specs = [repository.ModelSpec(name=repository.DEFAULT_NAME, checkpoint=model,
                                      tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel)]
    out = []
    for s in specs:
        tp = s.tensor_parallel if s.config is not None else tensor_parallel
        pp = s.pipeline_parallel if s.config is not None else pipeline_parallel
        if s.config is not None and (tensor_parallel, pipeline_parallel) != (1, 1) and (tp, pp) != (tensor_parallel, pipeline_parallel):
            raise ValueError(f"model {s.name}: config.pbtxt asks tensor_para_size={tp}, pipeline_para_size={pp} "
                             f"but the flags say --tensor-parallel {tensor_parallel} --pipeline-parallel {pipeline_parallel}")
        try:
            llm = ftjax.load(s.checkpoint, dtype=dtype or s.dtype or "bfloat16", max_batch_size=max_batch_size or 8,
                             max_seq_len=max_seq_len, attention=attention, tensor_parallel=tp,
                             pipeline_parallel=pp, quantize=quantize)
        except ValueError as e:
            where = f"model {s.name}" + (f" ({s.checkpoint})" if s.checkpoint else "")
            raise ValueError(f"{where}: {e}") from None
        t5 = getattr(llm.cfg, "arch", "gpt") == "t5"
        if s.config is not None and (s.model_type == "T5") != t5:
            raise ValueError(f"model {s.name}: config.pbtxt says model_type {s.model_type} but {s.checkpoint} holds "
                             f"a {'T5' if t5 else 'decoder-only'} model")
        cfg = s.config if s.config is not None else repository.default_config(s.name, s.max_request_batch,
                                                                                s.decoupled, t5=t5)
        repository.fill_io(cfg, t5=t5)
        out.append(Model(name=s.name, llm=llm, config=cfg, max_request_batch=s.max_request_batch,
                         decoupled=s.decoupled))
    return out
