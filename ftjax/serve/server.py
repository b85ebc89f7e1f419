"""Triton's `inference.GRPCInferenceService` over ftjax, with FasterTransformer's tensor names.

The service runs on grpc's asyncio server in one event-loop thread: every stream and every unary call
is a coroutine there, so per-token responses cost no thread hand-offs. Each model's scheduler thread
(ftjax/serve/scheduler.py) owns its engine and hands each iteration's updates to the loop in one
`call_soon_threadsafe`.

Implemented: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig,
ModelInfer, ModelStreamInfer, ModelStatistics, RepositoryIndex. The rest answer UNIMPLEMENTED
(the generated servicer base class does that).

    server = Server([Model(name, llm, spec)], host="127.0.0.1", grpc_port=0, metrics_port=0).start()
    ... server.grpc_port ...
    server.stop()
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time

import grpc
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg

import ftjax
from ftjax.serve import repository, tensors
from ftjax.serve.metrics import Metrics, MetricsServer
from ftjax.serve.scheduler import QueueFull, Request, Scheduler, StreamView

log = logging.getLogger("ftjax.serve")

_CODES = {"full": grpc.StatusCode.RESOURCE_EXHAUSTED, "cancelled": grpc.StatusCode.CANCELLED, "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
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
    async def ServerLive(self, request, context):  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=all(self._ready(m) for m in self.models.values()))

    def _ready(self, m: Model) -> bool:
        return m.scheduler is not None and m.scheduler.ready.is_set() and m.scheduler.error is None

    async def _model(self, name, version, context) -> Model:
        m = self.models.get(name)
        if m is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"model {name!r} not found; serving: {', '.join(self.models)}")
        if version not in ("", "1"):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {name!r} has no version {version!r} (only 1)")
        return m

    async def ModelReady(self, request, context):  # noqa: N802
        m = self.models.get(request.name)
        return pb.ModelReadyResponse(ready=m is not None and request.version in ("", "1") and self._ready(m))

    async def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(name="ftjax", version=ftjax.__version__,
                                         extensions=["classification", "model_configuration", "statistics"])

    async def ModelMetadata(self, request, context):  # noqa: N802
        m = await self._model(request.name, request.version, context)
        r = pb.ModelMetadataResponse(name=m.name, versions=["1"], platform="fastertransformer")
        batch = [-1] if m.config.max_batch_size > 0 else []
        for t in m.config.input:
            r.inputs.add(name=t.name, datatype=_dt(t.data_type), shape=batch + list(t.dims))
        for t in m.config.output:
            r.outputs.add(name=t.name, datatype=_dt(t.data_type), shape=batch + list(t.dims))
        return r

    async def ModelConfig(self, request, context):  # noqa: N802
        m = await self._model(request.name, request.version, context)
        return pb.ModelConfigResponse(config=m.config)

    async def RepositoryIndex(self, request, context):  # noqa: N802
        r = pb.RepositoryIndexResponse()
        for m in self.models.values():
            if request.ready and not self._ready(m):
                continue
            r.models.add(name=m.name, version="1", state="READY" if self._ready(m) else "UNAVAILABLE")
        return r

    async def ModelStatistics(self, request, context):  # noqa: N802
        names = [request.name] if request.name else list(self.models)
        r = pb.ModelStatisticsResponse()
        for n in names:
            m = await self._model(n, request.version, context)
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
        req.view = StreamView([[] if _is_t5(m) else list(r.prompt) for r in rows]) if stream else None
        req.model = m
        req.request_id = request.id
        req.requested = {o.name for o in request.outputs}
        known = tensors.T5_OUTPUTS if _is_t5(m) else tensors.GPT_OUTPUTS
        unknown = sorted(req.requested - set(known))
        if unknown:
            raise tensors.TensorError(f"{unknown[0]}: unknown output (the model's outputs: {', '.join(known)})")
        lp = sorted(req.requested & {"cum_log_probs", "output_log_probs"})
        if lp and not want_lp:
            raise tensors.TensorError(f"{lp[0]}: requested, but no row sets is_return_log_probs (the log probs "
                                      f"are computed only when asked for)")
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

    async def ModelInfer(self, request, context):  # noqa: N802
        m = await self._model(request.model_name, request.model_version, context)
        q: asyncio.Queue = asyncio.Queue()
        try:
            req = self._make_request(m, request, stream=False, on_update=q.put_nowait)
        except ValueError as e:
            m.n_fail += 1
            self.metrics.failed(m.name)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            m.scheduler.submit(req)
        except QueueFull as e:
            m.n_fail += 1
            self.metrics.failed(m.name)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        try:
            while True:
                u = await q.get()
                if u.kind == "done":
                    self._record(req, True)
                    return self._response(req, u.seqs, u.logprobs, None)
                if u.kind == "error":
                    self._record(req, False)
                    await context.abort(_CODES.get(u.code, grpc.StatusCode.INTERNAL), u.message)
        except asyncio.CancelledError:   # the client went away: free the slot at once
            req.cancel()
            m.scheduler.wake()
            raise

    async def ModelStreamInfer(self, request_iterator, context):  # noqa: N802
        out: asyncio.Queue = asyncio.Queue()
        reqs: list[Request] = []
        state = {"pending": 0, "reader_done": False}

        def cancel_all():
            for r in reqs:
                r.cancel()
            for m in self.models.values():
                if m.scheduler:
                    m.scheduler.wake()

        async def reader():
            try:
                async for request in request_iterator:
                    m = self.models.get(request.model_name)
                    if m is None or request.model_version not in ("", "1"):
                        msg = (f"model {request.model_name!r} not found; serving: {', '.join(self.models)}"
                               if m is None else f"model {request.model_name!r} has no version "
                               f"{request.model_version!r} (only 1)")
                        out.put_nowait((None, (msg, request)))
                        continue
                    holder = {}
                    try:
                        req = self._make_request(m, request, stream=True,
                                                 on_update=lambda u, h=holder: out.put_nowait((h["r"], u)))
                        holder["r"] = req
                        req.decoupled = m.decoupled
                        m.scheduler.submit(req)
                        reqs.append(req)
                        state["pending"] += 1
                    except (ValueError, QueueFull) as e:
                        m.n_fail += 1
                        self.metrics.failed(m.name)
                        out.put_nowait((None, (str(e), request)))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - stream broken by the client
                log.debug("stream reader ended: %s", e)
                cancel_all()
            finally:
                out.put_nowait(None)

        task = asyncio.get_running_loop().create_task(reader())
        try:
            while not (state["reader_done"] and state["pending"] == 0 and out.empty()):
                item = await out.get()
                if item is None:
                    state["reader_done"] = True
                    continue
                req, u = item
                if req is None:   # refused before it reached a scheduler: the response names its request
                    msg, request = u
                    yield _stream_error(msg, request.id, request.model_name)
                    continue
                if u.kind == "tokens":
                    seqs_per_token = req.view.expand(u.new, u.whole)
                    if getattr(req, "decoupled", True):
                        for seqs in seqs_per_token:
                            yield pb.ModelStreamInferResponse(infer_response=self._token_response(req, seqs))
                    continue
                state["pending"] -= 1
                if u.kind == "done":
                    self._record(req, True)
                    yield pb.ModelStreamInferResponse(infer_response=self._response(req, u.seqs, u.logprobs, True))
                else:
                    self._record(req, False)
                    yield _stream_error(f"[{u.code}] {u.message}", req.request_id, req.model.name)
        finally:   # finished, or the client went away (the task is cancelled): free every slot
            if not task.done():
                task.cancel()
            if state["pending"]:
                cancel_all()

    def _token_response(self, req: Request, seqs) -> pb.ModelInferResponse:
        """A streamed token: output_ids [rows, 1, len] and sequence_length so far (no log probs)."""
        return self._response(req, [[s] for s in seqs], None, False)


def _stream_error(message: str, request_id: str, model_name: str) -> pb.ModelStreamInferResponse:
    """An error on a stream, carrying the failed request's id (as Triton does), so that a client with several
    requests in flight on one stream knows which one failed."""
    return pb.ModelStreamInferResponse(
        error_message=message, infer_response=pb.ModelInferResponse(id=request_id, model_name=model_name,
                                                                    model_version="1"))


def _is_t5(m) -> bool:
    return getattr(m.llm.cfg, "arch", "gpt") == "t5"


def _dt(t: int) -> str:
    s = mc.DataType.Name(t).replace("TYPE_", "")
    return "BYTES" if s == "STRING" else s


class Server:
    """The gRPC service (grpc.aio, on an event loop of its own thread), the schedulers and the metrics.
    frontends > 1: the service runs in that many spawned processes sharing the port (ftjax/serve/
    frontend.py); this process keeps the engines. remote: this *is* such a front end (no engines)."""

    def __init__(self, models: list[Model], *, host: str = "127.0.0.1", grpc_port: int = 8001,
                 metrics_port: int | None = 8002, max_queue: int = 1024, request_timeout: float | None = None,
                 chunk: int = 8, stream_chunk: int = 1, frontends: int = 1, remote=None,
                 warmup: tuple[str, ...] = (), warmup_lengths: tuple[int, ...] = (16,)):
        if frontends < 1:
            raise ValueError(f"frontends: must be >= 1, got {frontends}")
        self.metrics = Metrics()
        self.models = {m.name: m for m in models}
        for m in models:
            if remote is not None:
                m.scheduler = remote.proxy(m.name)
                continue
            m.scheduler = Scheduler(m.llm, max_queue=max_queue, chunk=chunk, stream_chunk=stream_chunk,
                                    metrics=self.metrics, model_name=m.name)
            m.scheduler.warmup, m.scheduler.warmup_lengths = tuple(warmup), tuple(warmup_lengths)
            self.metrics.waiting_fn[m.name] = (lambda s=m.scheduler: s.waiting)
        self.host = host
        self._hub = self._loop = None
        if frontends > 1:
            from ftjax.serve.frontend import Hub

            self._hub = Hub(self.models, host, grpc_port, frontends, request_timeout)
            self.grpc_port = self._hub.port
        else:
            self.service = Service(self.models, self.metrics, request_timeout)
            self._loop = asyncio.new_event_loop()
            self._loop_thread = threading.Thread(target=self._loop.run_forever, name="ftjax-grpc", daemon=True)
            self._loop_thread.start()
            for m in models:
                m.scheduler.deliver = self._deliver
            try:
                self.grpc, self.grpc_port = self._call(self._build(host, grpc_port, reuseport=remote is not None))
            except BaseException:
                self._close_loop()
                raise
        self.metrics_server = MetricsServer(self.metrics, host, metrics_port) if metrics_port is not None else None
        self.metrics_port = self.metrics_server.port if self.metrics_server else None

    async def _build(self, host, port, reuseport=False):
        srv = grpc.aio.server(options=[("grpc.max_send_message_length", -1),
                                       ("grpc.max_receive_message_length", -1),
                                       ("grpc.so_reuseport", 1 if reuseport else 0)])
        pbg.add_GRPCInferenceServiceServicer_to_server(self.service, srv)
        try:
            bound = srv.add_insecure_port(f"{host}:{port}")
        except RuntimeError as e:   # grpc raises when the address is taken
            raise OSError(f"cannot bind gRPC to {host}:{port}: {e}") from None
        if bound == 0:
            raise OSError(f"cannot bind gRPC to {host}:{port}")
        return srv, bound

    def _call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _deliver(self, items):
        """Scheduler thread -> event loop: one hop per scheduler iteration, whatever the stream count."""
        try:
            self._loop.call_soon_threadsafe(Scheduler._deliver_each, items)
        except RuntimeError:   # the loop is closed: the server is gone
            pass

    def start(self, wait_ready: float = 600.0):
        for m in self.models.values():
            m.scheduler.start()
        for m in self.models.values():
            m.scheduler.ready.wait(wait_ready)
            if m.scheduler.error is not None:
                raise RuntimeError(f"model {m.name}: engine failed to start: {m.scheduler.error}")
        if self._hub is not None:
            try:
                self._hub.start()
            except BaseException:
                self.stop()
                raise
        else:
            self._call(self.grpc.start())
        if self.metrics_server:
            self.metrics_server.start()
        return self

    def stop(self, grace: float = 1.0):
        if self._hub is not None:
            self._hub.stop(grace)
        elif self._loop.is_running():
            try:
                self._call(self.grpc.stop(grace), timeout=grace + 10)
            except Exception:  # noqa: BLE001 - stopping anyway
                log.exception("grpc stop")
        for m in self.models.values():
            m.scheduler.stop()
        if self.metrics_server:
            self.metrics_server.stop()
        self._close_loop()

    def _close_loop(self):
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(10)

    def wait(self):
        if self._hub is not None:
            self._hub.wait()
        else:
            self._call(self.grpc.wait_for_termination())


def load_models(*, model: str | None = None, model_repository: str | None = None, dtype: str | None = None,
                max_batch_size: int | None = None, max_seq_len: int | None = None, tensor_parallel: int = 1,
                pipeline_parallel: int = 1, quantize: str | None = None, attention: str = "auto",
                max_beam_width: int = 4) -> list[Model]:
    """The models a server serves: a repository, one checkpoint, or the embedded default."""
    if model and model_repository:
        raise ValueError("--model and --model-repository are exclusive")
    if model_repository:
        specs = repository.load_repository(model_repository)
    else:
        # reported as the example repository's config does (max_batch_size 1024, dims without the batch): a
        # client that builds its inputs from the model's metadata sends [batch, ...] tensors, as the server reads
        specs = [repository.ModelSpec(name=repository.DEFAULT_NAME, checkpoint=model,
                                      tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                                      max_request_batch=repository.DEFAULT_MAX_BATCH)]
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
                             pipeline_parallel=pp, quantize=quantize or ("int8" if s.int8_mode == 1 else None),
                             max_beam_width=max_beam_width)
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
