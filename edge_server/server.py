"""Start serving: resolve the model, bind the port, load the model in the background, run waitress."""

from __future__ import annotations

import _thread
import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from pydantic import ValidationError

from edge_server.api.app import create_app
from edge_server.engine import fatal, rpc
from edge_server.engine.loader import check_gguf_file, free_engine, load_engine
from edge_server.engine.speculation import SpecConfig
from edge_server.engine.types import ModelLoadError
from edge_server.http_server import create_hardened_server
from edge_server.modelstore import read_models_file, resolve_model
from edge_server.api.security import warn_if_exposed
from edge_server.settings import EXIT_CONFIG, Settings
from edge_server.api.observability import metrics_of
from edge_server.api.registry import ModelRegistry, ModelSpec, model_role
from edge_server.api.state import ServedModel, ServerState, state_of

log = logging.getLogger("edge_server")



def serve(settings: Settings) -> int:
    """Serve until interrupted; returns the exit status (2 for an unusable model or port)."""
    try:
        specs = resolve_models(settings)
    except ModelLoadError as error:
        log.error("%s", error)
        return EXIT_CONFIG
    if specs[0].demo_warning:
        log.warning("!" * 78)
        log.warning("%s", specs[0].demo_warning)
        log.warning("!" * 78)
    warn_if_exposed(settings)
    app = create_app(settings)
    try:
        server = create_hardened_server(
            app,
            settings,
            threads=settings.parallel + settings.max_queue + 4,  # every waiting request holds a thread
            channel_request_lookahead=1,  # lets a request notice its client hang up without writing
            ident="edge-server",
            clear_untrusted_proxy_headers=True,
        )
    except OSError as error:
        log.error("cannot listen on %s:%s: %s", settings.host, settings.port, error.strerror or error)
        return EXIT_CONFIG
    state = state_of(app)
    state.registry = ModelRegistry(specs, functools.partial(_load_model, settings), max_loaded=settings.max_loaded,
                                   idle_unload=settings.idle_unload, events=metrics_of(app).model_event)
    threading.Thread(target=_preload, args=(state.registry,), name="edge-loader", daemon=True).start()
    fatal.on_fatal(functools.partial(_report_failure, state, server), last=True)
    if settings.rpc:
        threading.Thread(target=_watch_steps, args=(state.registry, settings.rpc_timeout, settings.rpc), name="edge-step-watch",
                         daemon=True).start()
    if settings.idle_unload:
        threading.Thread(target=_unload_idle, args=(state.registry,), name="edge-idle-unload", daemon=True).start()
    log.info("listening on http://%s:%s (model loading; GET /health is 503 until ready)",
             settings.host, server.effective_port)
    shutdown = GracefulShutdown(server, state, settings.shutdown_grace)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, shutdown.begin)
    try:
        server.run()
    except KeyboardInterrupt:
        if not shutdown.started:
            log.info("interrupted; shutting down at once")
    finally:
        state.registry.close()
    log.info("stopped")
    return 0


class GracefulShutdown:
    """On SIGTERM or Ctrl-C: stop accepting, let open streams end within the grace period, then stop.

    A second signal stops at once.
    """

    def __init__(self, server, state: ServerState, grace_seconds: float):
        self._server = server
        self._state = state
        self._grace = grace_seconds
        self.started = False

    def begin(self, signum: int, frame) -> None:
        """The signal handler (runs on the main thread, inside waitress's loop)."""
        if self.started:
            raise KeyboardInterrupt
        self.started = True
        self._state.shutting_down = True
        running = self._state.running()
        log.info("%s: no new connections; %d running request(s) get up to %gs to finish",
                 signal.Signals(signum).name, running, self._grace)
        self._server.accepting = False  # not readable any more: nothing new is accepted
        # Close the listener from inside the loop: here, select() may be about to use its descriptor.
        self._server.trigger.pull_trigger(self._stop_listening)
        threading.Thread(target=self._drain, name="edge-shutdown", daemon=True).start()

    def _stop_listening(self) -> None:
        self._server.del_channel()
        self._server.socket.close()

    def _drain(self) -> None:
        if self._state.registry is not None:
            self._state.registry.drain(self._grace)
        dispatcher = self._server.task_dispatcher
        deadline = time.monotonic() + 5
        while (dispatcher.active_count or dispatcher.queue) and time.monotonic() < deadline:
            time.sleep(0.02)  # let the HTTP threads write the final events
        _thread.interrupt_main()
        self._server.trigger.pull_trigger()  # wake the loop now rather than at its select() timeout


def resolve_models(settings: Settings) -> list[ModelSpec]:
    """Each `--model` found or downloaded and checked (the newest local GGUF, the default download or the
    demo model when none is given), with its id and role; `ModelLoadError` for an unusable one."""
    names = settings.model or (() if settings.models_file else (None,))
    specs = []
    for index, name in enumerate(names):
        alias = settings.model_alias[index] if index < len(settings.model_alias) else None
        resolved = resolve_model(name, settings.models_dir, alias=alias, timeout=settings.download_timeout)
        check_gguf_file(resolved.path)
        mmproj = _projector(settings, settings.mmproj[index]) if index < len(settings.mmproj) else resolved.mmproj
        specs.append(ModelSpec(resolved.model_id, resolved.path, model_role(resolved.path), resolved.demo_warning,
                               mmproj=mmproj))
    for entry in read_models_file(settings.models_file) if settings.models_file else []:
        try:  # the model's own settings, checked now (a bad one exits 2 before anything loads)
            Settings.model_validate({**settings.model_dump(exclude_unset=True), **entry.settings()})
        except ValidationError as error:
            first = error.errors(include_url=False)[0]
            raise ModelLoadError(f"--models-file: model {entry.id!r}: {first['msg']}") from None
        resolved = resolve_model(entry.model, settings.models_dir, alias=entry.id, timeout=settings.download_timeout)
        check_gguf_file(resolved.path)
        specs.append(ModelSpec(entry.id, resolved.path, entry.role or model_role(resolved.path),
                               options=entry.settings(),
                               mmproj=_projector(settings, entry.mmproj) if entry.mmproj else resolved.mmproj))
    ids = [spec.id for spec in specs]
    if len(set(ids)) != len(ids):
        raise ModelLoadError(f"two models share an id ({', '.join(ids)}); name them with --model-alias")
    return specs


def _preload(registry: ModelRegistry) -> None:
    try:
        registry.preload()
    except ModelLoadError:
        logging.shutdown()
        os._exit(EXIT_CONFIG)  # the HTTP server runs on the main thread; nothing useful is left to serve


def _report_failure(state: ServerState, server, reason: str) -> None:
    """The backend failed (`engine.fatal`): /health says so, and the HTTP threads get a few seconds to write the
    error events the engines just sent, before the process exits."""
    state.failure = reason
    dispatcher = server.task_dispatcher
    deadline = time.monotonic() + 5
    caller = 1 if threading.current_thread().name.startswith("waitress") else 0  # e.g. an embedding's decode
    while (dispatcher.active_count > caller or dispatcher.queue) and time.monotonic() < deadline:
        time.sleep(0.02)
    # The handlers are done once their events are in the channels' buffers; the main loop still sends them.
    while time.monotonic() < deadline and any(getattr(channel, "total_outbufs_len", 0)
                                              for channel in list(server._map.values())):
        time.sleep(0.02)


def _watch_steps(registry: ModelRegistry, limit: float, workers: tuple[str, ...]) -> None:
    """With RPC workers a lost machine can leave a step or a load waiting forever (no reset ever arrives): past
    `limit` seconds without progress that is a backend failure."""
    while True:
        time.sleep(min(1.0, limit / 4))
        if rpc.LOADS.stalled_for() > limit:
            fatal.fail(f"loading a model waited {limit:g}s for the RPC workers ({', '.join(workers)}) without "
                       "progress")
        for served in registry.loaded():
            since = served.engine.step_since
            if since is not None and time.monotonic() - since > limit:
                fatal.fail(f"a decoding step waited {limit:g}s for the RPC workers ({', '.join(workers)}) "
                           "without an answer")


def _speculation(settings: Settings) -> SpecConfig | None:
    """The speculative decoding a chat model is served with (embedding models generate nothing)."""
    if settings.spec_type == "none":
        return None
    return SpecConfig(settings.spec_type, settings.spec_draft_n_max, settings.spec_draft_n_min,
                      settings.spec_draft_p_min, str(settings.spec_draft_model) if settings.spec_draft_model else None)


def _describe(share) -> str:
    where = f" ({share.endpoint})" if share.endpoint else ""
    return f"{share.name}{where} {share.layers} layers, {share.weights_mib:.1f} MiB weights, {share.kv_mib:.1f} MiB KV"


def _unload_idle(registry: ModelRegistry) -> None:
    while True:
        time.sleep(min(5.0, registry.idle_unload / 4))
        registry.unload_idle()


def _projector(settings: Settings, name: str) -> Path:
    """A `--mmproj` found or downloaded like a model, and checked."""
    path = resolve_model(name, settings.models_dir, timeout=settings.download_timeout).path
    check_gguf_file(path)
    return path


def _load_model(settings: Settings, spec: ModelSpec) -> ServedModel:
    settings = settings.model_copy(update=spec.options)  # --models-file settings of this model (checked)
    with rpc.LOADS.watching() if settings.rpc else contextlib.nullcontext():  # the watchdog ends a stalled load
        engine = load_engine(spec.path, n_ctx=settings.n_ctx, n_gpu_layers=settings.n_gpu_layers,
                             threads=settings.threads, parallel=settings.parallel, max_queue=settings.max_queue,
                             flash_attn=settings.flash_attn, adapt_threads=not settings.fixed_threads,
                             fault_seed=settings.fault_seed, cache_type_k=settings.cache_type_k,
                             cache_type_v=settings.cache_type_v, kv_unified=settings.kv_unified,
                             rpc_workers=settings.rpc, tensor_split=settings.tensor_split,
                             speculation=_speculation(settings) if spec.role == "chat" else None,
                             ctx_checkpoints=settings.ctx_checkpoints,
                             ctx_checkpoint_mib=settings.ctx_checkpoint_mib, swa_full=settings.swa_full,
                             mmproj=spec.mmproj)
    info = engine.info
    served = ServedModel.of(engine, spec.id, spec.demo_warning, chat_template=settings.chat_template)
    served.release = functools.partial(free_engine, engine)
    log.info(
        "model ready: %s (id %r, %s) backend=%s layers_offloaded=%d/%d n_ctx=%d (trained %d) threads=%d%s "
        "parallel=%d chat_template=%s%s%s%s",
        info.path, spec.id, spec.role, info.backend, info.gpu_layers, info.n_layer + 1, info.n_ctx,
        info.n_ctx_train, info.threads, " (fixed)" if settings.fixed_threads else " (fewer while faster)",
        settings.parallel, served.renderer.template.label,
        " (thinking: reasoning_content)" if served.renderer.thinks and settings.reasoning_format == "separate" else "",
        f" speculation={engine.speculation.kind} (drafts of up to {engine.speculation.n_max}"
        f"{', by ' + engine.draft_model.path.name if engine.draft_model else ''})"
        if engine.speculation else "",
        f" vision (projector {spec.mmproj.name})" if info.vision else "",
    )
    if settings.rpc:
        log.info("model %r split: %s", spec.id, "; ".join(_describe(share) for share in info.devices))

    sys.stderr.flush()
    return served
