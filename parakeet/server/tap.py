"""
The server's options and service tree, shared by ``parakeet-server serve``
and ``twistd parakeet``.
"""

import sys
import threading

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import failure, usage

from .. import __version__
from ..audio import MAX_RATE, MIN_RATE
from ..checkpoints import MODEL_SIZES, PRECISIONS, check_reachable, resolve_model, served_name
from ..options import CommandOptions, not_negative, port_number, positive

log = Logger()


def _ping_interval(value):
    seconds = float(value)
    if seconds and seconds < 2:
        raise ValueError("must be 0 (no pings) or at least 2 seconds")
    return seconds


def _sample_rate(value):
    rate = int(value)
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError("the sample rate must be between %d and %d Hz" % (MIN_RATE, MAX_RATE))
    return rate


def _probability(value):
    p = float(value)
    if not 0 < p < 1:
        raise ValueError("must be between 0 and 1")
    return p


def _model_size(value):
    if value not in MODEL_SIZES:
        raise ValueError("choose one of: %s" % ", ".join(sorted(MODEL_SIZES)))
    return value


def _precision(value):
    if value not in PRECISIONS:
        raise ValueError("choose one of: %s" % ", ".join(PRECISIONS))
    return value


#: What listens: (its port flag, the name of its listening service).
LISTENERS = {
    "tcp": ("port", "TCP clients"),
    "ws": ("ws-port", "WebSocket clients"),
    "status": ("status-port", "status checks"),
    "http": ("http-port", "HTTP"),
    "agent": ("agent-port", "HAProxy agent checks"),
}


def _listen_flag(kind):
    return "listen-" + kind


def _listen_option(kind):
    def opt(self, description):
        self[_listen_flag(kind)].append(description)
    opt.__doc__ = ("A Twisted endpoint string to listen on for %s instead of "
                   "--host/--%s (e.g. ssl:PORT:privateKey=KEY:certKey=CERT); "
                   "repeatable." % (LISTENERS[kind][1], LISTENERS[kind][0]))
    return opt


class Options(CommandOptions):
    synopsis = "[options]"
    longdesc = ("Serve streaming speech recognition to TCP (newline-delimited "
                "JSON) and WebSocket clients with an NVIDIA cache-aware streaming "
                "FastConformer RNNT model.")

    optParameters = [
        ("host", None, "0.0.0.0", "Interface to listen on."),
        ("port", None, 8765, "TCP port (newline-delimited JSON); 0 picks a free one.",
         port_number),
        ("ws-port", None, 8000, "WebSocket port (one JSON object per message); "
         "0 picks a free one.", port_number),
        ("status-port", None, None, "One-shot status port, off unless given.", port_number),
        ("http-port", None, None, "HTTP port, off unless given: the browser page at /, "
         "the stream WebSocket at /ws, /healthz, /readyz and Prometheus /metrics.",
         port_number),
        ("agent-port", None, None, "HAProxy agent-check port, off unless given.",
         port_number),
        ("model-size", None, "small",
         "Model to serve: small (%s), large (%s) or multilingual (%s)."
         % (MODEL_SIZES["small"], MODEL_SIZES["large"], MODEL_SIZES["multilingual"]),
         _model_size),
        ("language", None, None, "A multilingual model's language for streams that "
         "choose none, e.g. de-DE [default: auto, the model picks]."),
        ("model", None, None, "'demo' (the built-in model, no download), a "
         "Hugging Face model id or a local .nemo file of any NeMo cache-aware "
         "RNNT model; overrides --model-size."),
        ("device", None, None, "PyTorch device: cpu, cuda or cuda:N "
         "[default: cuda when available, else cpu]."),
        ("precision", None, None, "Model arithmetic: float32, bfloat16, float16, or "
         "int8 (CPU only: eight-bit encoder weights, about a third faster per step, "
         "results within quantization error of float32) [default: bfloat16 on CUDA, "
         "float32 on the CPU].", _precision),
        ("sample-rate", None, 16000, "Sample rate of the audio clients send, in Hz "
         "(8000-48000); resampled to the model's rate when different.", _sample_rate),
        ("max-num-streams", None, 100, "Most concurrent streams; more are refused.",
         positive(int)),
        ("max-stream-seconds", None, 300.0, "Most audio one stream may send, in "
         "seconds; the stream is finalized when it is reached.", positive(float)),
        ("max-message-bytes", None, 1 << 20, "Largest client message (a TCP line or "
         "a WebSocket message), in bytes.", positive(int)),
        ("max-batch", None, None, "Most streams decoded in one model step "
         "[default: --max-num-streams].", positive(int)),
        ("idle-timeout", None, 60.0, "Seconds a stream may go without any message "
         "(audio, ping) before it is finalized; 0: never.", not_negative(float)),
        ("write-timeout", None, 30.0, "Seconds a client may leave the server's messages "
         "unread before its connection is dropped; 0: never.", not_negative(float)),
        ("max-backlog-seconds", None, 10.0, "Seconds of a stream's audio received but "
         "not yet decoded at which the server stops reading from that client until "
         "the decoder catches up.", positive(float)),
        ("drain-seconds", None, 10.0, "On SIGTERM, seconds to finish decoding the open "
         "streams and send their final results before exiting.",
         not_negative(float)),
        ("ws-ping-interval", None, 20.0, "Seconds between WebSocket pings (2 or more: "
         "the timers have one-second resolution); a client that does not answer "
         "within as long again is dropped; 0: no pings.", _ping_interval),
        ("chunk-ms", None, None, "Audio per model step in ms, for models trained "
         "with several look-aheads (80, 160, 560 or 1120 for the large model; 80, "
         "320, 560 or 1120 for the multilingual one) [default: the model's own].",
         positive(int)),
        ("vad-threshold", None, 0.5, "Speech probability (0-1) at which voice activity "
         "detection counts a 32 ms window as speech.", _probability),
        ("vad-min-silence-ms", None, 300, "Milliseconds below the threshold before a "
         "stream's state turns from speech to silence.", not_negative(int)),
        ("keyterms", None, None, "A file of phrases every stream's decoding favours "
         "(names, jargon), one a line; streams add their own (config \"keyterms\")."),
        ("keyterm-weight", None, 1.0, "How much key terms are favoured: added to the "
         "log-probability of their tokens (too much puts them where they were not said).",
         positive(float)),
        ("eou-silence-ms", None, 800, "Milliseconds without a new token, heard as "
         "silence, that end an utterance (NeMo's stop_history_eou; models with an "
         "<EOU> token usually end it sooner); 0: only <EOU>, flush and the end of the "
         "stream end utterances.", not_negative(int)),
        ("finalize-silence-ms", None, 0, "Finalize a stream after this many ms of "
         "silence following speech (its final result is sent and its slot freed); "
         "0: never, the client decides.", not_negative(int)),
        ("auth-tokens", None, None, "File of access tokens, one per line (# comments); "
         "clients must present one to open a stream.  Re-read on SIGHUP.  Off unless "
         "given."),
        ("allowed-origins", None, None, "Comma-separated web origins whose pages may "
         "open WebSockets (e.g. https://app.example.com,http://localhost:8080); other "
         "Origin headers get HTTP 403 [default: any origin]."),
    ]
    optFlags = [
        ("no-vad", None, "No voice activity detection (results carry last_state null)."),
        ("itn", None, "Inverse text normalisation: an utterance's text as people write it "
         "(\"07:30\", \"29340\"), its spoken words in spoken_text; a stream may turn it "
         "off (config \"itn\": false).  Needs the itn extra."),
        ("cuda-graph-decoder", None, "On CUDA, run the greedy decoder's loop as CUDA "
         "graphs (NeMo's label-looping decoder): fewer kernel launches a step."),
    ]

    def __init__(self):
        CommandOptions.__init__(self)
        for kind in LISTENERS:
            self[_listen_flag(kind)] = []
        #: The phrases of the --keyterms file.
        self.keyterms = ()

    def postOptions(self):
        from twisted.internet import endpoints, reactor

        for kind in LISTENERS:
            for description in self[_listen_flag(kind)]:
                try:
                    endpoints.serverFromString(reactor, description)
                except Exception as e:
                    raise usage.UsageError("--%s %s: %s" % (_listen_flag(kind), description, e))
        if self["max-batch"] is None:
            self["max-batch"] = self["max-num-streams"]
        if self["keyterms"] is not None:
            from .messages import ProtocolError, check_keyterms

            try:
                with open(self["keyterms"], encoding="utf-8") as f:
                    lines = [line.strip() for line in f]
                self.keyterms = check_keyterms([line for line in lines
                                                if line and not line.startswith("#")])
            except (OSError, UnicodeDecodeError) as e:
                raise usage.UsageError("--keyterms: cannot read %s: %s"
                                       % (self["keyterms"], getattr(e, "strerror", None) or e))
            except ProtocolError as e:
                raise usage.UsageError("--keyterms: %s" % (e,))
        if self["itn"]:
            from ..engine.nemo.itn import unsupported_reason

            reason = unsupported_reason()
            if reason is not None:
                raise usage.UsageError("--itn: %s" % (reason,))
        self._check_access()

    def _check_access(self):
        from .auth import AuthConfigError, parse_origins, read_tokens

        if self["auth-tokens"] is not None:
            try:
                read_tokens(self["auth-tokens"])
            except AuthConfigError as e:
                raise usage.UsageError("--auth-tokens: %s" % (e,))
        if self["allowed-origins"] is not None:
            try:
                parse_origins(self["allowed-origins"])
            except ValueError as e:
                raise usage.UsageError("--allowed-origins: %s" % (e,))

    opt_listen_tcp = _listen_option("tcp")
    opt_listen_ws = _listen_option("ws")
    opt_listen_status = _listen_option("status")
    opt_listen_http = _listen_option("http")
    opt_listen_agent = _listen_option("agent")

    def opt_version(self):
        """Print the version and exit."""
        print("parakeet-server %s" % (__version__,))
        sys.exit(0)

    def endpoints(self, kind):
        """The endpoint strings to listen on for kind (a key of LISTENERS)."""
        given = self[_listen_flag(kind)]
        if given:
            return list(given)
        from .transports import tcp_endpoint

        port = self[LISTENERS[kind][0]]
        return [] if port is None else [tcp_endpoint(self["host"], port)]


def in_own_thread(reactor, f, *args, **kwargs):
    """A Deferred firing with f(*args, **kwargs), run on a thread of its own
    that ends when f returns.

    Loading a model runs torch operators, and the first thread to run one
    keeps a team of OpenMP workers for as long as it lives.  Loaded on a
    thread that lives on (the reactor's, or a pool's), that team would
    compete with the model thread's own on every step: measured, steps took
    50 % longer.  A thread that has ended takes its team with it."""
    d = defer.Deferred()

    def run():
        try:
            result = f(*args, **kwargs)
        except BaseException:
            reactor.callFromThread(d.errback, failure.Failure())
        else:
            reactor.callFromThread(d.callback, result)

    threading.Thread(target=run, name="parakeet-load", daemon=True).start()
    return d


def model_info(engine):
    """What a hello, the status port and /metrics say of engine's model."""
    from .registry import ModelInfo

    return ModelInfo(
        served_name(engine.model_name), str(engine.device), engine.precision,
        round(engine.geometry.chunk_seconds * 1000), engine.chunk_sizes_ms,
        engine.sample_rate, engine.languages, engine.default_language)


def load_engine(config):
    """The engine for config (blocking: run it off the reactor thread)."""
    from ..engine.allocator import freeze_loaded_objects

    name = resolve_model(config["model"], config["model-size"])
    check_reachable(name)
    from ..engine.engine import Engine

    engine = Engine.load(
        name, device=config["device"],
        num_slots=config["max-num-streams"], batch_size=config["max-batch"],
        chunk_ms=config["chunk-ms"], precision=config["precision"], vad=not config["no-vad"],
        cuda_graph_decoder=config["cuda-graph-decoder"])
    if config["language"] is not None:
        language = model_info(engine).check_language(config["language"])
        if engine.languages:
            engine.default_language = language
    engine.warm_up()
    freeze_loaded_objects()
    return engine


def load_normalizer(config):
    """The ITN normaliser if config asks for one, else None (blocking)."""
    if not config["itn"]:
        return None
    from ..engine.nemo.itn import Normalizer

    return Normalizer()


def load_model(config):
    """(engine, normaliser or None) for config (blocking)."""
    return load_engine(config), load_normalizer(config)


def makeService(config, reactor=None, engine=None):
    """The server; engine: a loaded one, used as it is (with or without its
    voice activity detection), else the service loads the model as config
    says when it starts, answering probes (and refusing streams) meanwhile."""
    if reactor is None:
        from twisted.internet import reactor
    from ..engine.allocator import use_one_arena
    from .auth import TokenReloader, TokenStore, parse_origins
    from .decodeloop import DecodeLoop
    from .health import Health
    from .metrics import ServerMetrics
    from .protocol import Limits
    from .registry import StreamRegistry
    from .transports import (
        AgentCheckFactory, Listener, Sessions, StatusFactory, StreamLineFactory,
        StreamWebSocketFactory)
    from .turns import TurnSettings
    from .web import api_resources, http_site
    from .apis.deepgram import ListenFactory
    from .apis.realtime import RealtimeFactory

    use_one_arena()  # before the model thread allocates
    log.info("parakeet-server {version} starting: {settings}", version=__version__,
             settings=" ".join("--%s=%s" % (k, config[k]) for k in sorted(config)
                               if k not in ("help", "version")))
    # The registry learns the model's geometry once it is loaded; until then
    # it refuses streams.
    registry = StreamRegistry(config["max-num-streams"], None, config["sample-rate"], reactor)
    limits = Limits(max_stream_seconds=config["max-stream-seconds"],
                    max_message_bytes=config["max-message-bytes"],
                    idle_timeout=config["idle-timeout"],
                    max_backlog_seconds=config["max-backlog-seconds"],
                    write_timeout=config["write-timeout"],
                    turns=TurnSettings(config["vad-threshold"], config["vad-min-silence-ms"],
                                       config["finalize-silence-ms"]),
                    keyterms=config.keyterms)
    health = Health(registry)
    metrics = ServerMetrics()
    metrics.attach(registry)
    tokens = None if config["auth-tokens"] is None else TokenStore(config["auth-tokens"])
    origins = (None if config["allowed-origins"] is None
               else parse_origins(config["allowed-origins"]))
    # It decodes once the model is loaded (ServerService.serve).
    loop = DecodeLoop(None, registry, reactor, max_batch=config["max-batch"])
    line_factory = StreamLineFactory(registry, loop, limits, reactor, auth=tokens)
    websocket_factory = StreamWebSocketFactory(registry, loop, limits, reactor,
                                               config["ws-ping-interval"], auth=tokens,
                                               allowed_origins=origins)
    top = ServerService(config, reactor, registry, loop, health, metrics)
    if tokens is not None:
        # SIGHUP re-reads the token file.
        TokenReloader(tokens, reactor).setServiceParent(top)
    factories = {
        "tcp": line_factory,
        "ws": websocket_factory,
        "status": StatusFactory(health),
        "http": http_site(health, websocket_factory, metrics.resource(),
                          api_resources(Sessions(registry, loop, limits), reactor,
                                        RealtimeFactory(registry, loop, limits, reactor,
                                                        config["ws-ping-interval"],
                                                        auth=tokens, allowed_origins=origins),
                                        ListenFactory(registry, loop, limits, reactor,
                                                      config["ws-ping-interval"],
                                                      auth=tokens, allowed_origins=origins),
                                        auth=tokens)),
        "agent": AgentCheckFactory(health),
    }
    for kind, factory in factories.items():
        what = LISTENERS[kind][1]
        for i, description in enumerate(config.endpoints(kind)):
            Listener(reactor, description, factory,
                     what if i == 0 else "%s (%d)" % (what, i + 1)).setServiceParent(top)
    if engine is not None:
        top.serve(engine, load_normalizer(config))
    return top


class ServerService(service.MultiService):
    """The server.

    Its listeners start at once; the model is loaded on a thread of its own
    (unless one was given), and streams are accepted once it is loaded and
    warm.  On stop, it drains its streams before its ports close, so that
    clients connecting meanwhile are told the server is shutting down."""

    def __init__(self, config, reactor, registry, loop, health, metrics):
        service.MultiService.__init__(self)
        self.config = config
        self.reactor = reactor
        self.registry = registry
        self.health = health
        self.metrics = metrics
        self.loop = loop
        loop.setName("decoder")
        loop.setServiceParent(self)
        #: What the process exits with: 1 once the model failed to load.
        self.exit_code = 0
        self._loading = None
        self._stopping = None

    def serve(self, engine, normalizer=None):
        """Start decoding with engine, a loaded model; normalizer: the ITN
        normaliser, if streams get written forms."""
        engine.endpointing_ms = self.config["eou-silence-ms"]
        engine.keyterm_weight = self.config["keyterm-weight"]
        self.loop.engine = engine
        if normalizer is not None:
            from .itn import WrittenForms

            written = WrittenForms(self.reactor, normalizer)
            written.setServiceParent(self)
            self.loop.itn = written
        self.metrics.attach(self.registry, self.loop, engine)
        self.registry.geometry = engine.geometry
        self.registry.model = model_info(engine)
        self.health.loaded = True
        log.info("ready: serving {model} on {device} in {precision}: {chunk_ms:.0f} ms "
                 "chunks, {rate} Hz model audio", model=engine.model_name,
                 device=engine.device, precision=engine.precision,
                 chunk_ms=engine.geometry.chunk_seconds * 1000, rate=engine.sample_rate)

    def startService(self):
        self._stopping = None
        service.MultiService.startService(self)
        if self.loop.engine is None and self._loading is None:
            log.info("loading the model")
            self._loading = in_own_thread(self.reactor, load_model, self.config)
            self._loading.addCallbacks(self._loaded, self._load_failed)

    def _loaded(self, loaded):
        if self.running and self._stopping is None:
            self.serve(*loaded)

    def _load_failed(self, reason):
        from ..checkpoints import CannotServe

        if reason.check(CannotServe, ValueError):
            message = reason.getErrorMessage()
        else:
            log.failure("loading the model failed", reason)
            message = "loading the model failed: %s" % (reason.getErrorMessage(),)
        sys.stderr.write("parakeet-server: %s\n" % (message,))
        sys.stderr.flush()
        self.exit_code = 1
        self.reactor.stop()

    def stopService(self):
        """Drain, then stop; a second call while stopping waits for the first."""
        if self._stopping is None:
            self._stopping = self._stop()
        return self._stopping

    @defer.inlineCallbacks
    def _stop(self):
        self.registry.closed = True
        yield self.loop.drain(self.config["drain-seconds"])
        yield service.MultiService.stopService(self)
