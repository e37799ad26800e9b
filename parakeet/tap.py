"""
The server's options and service tree, shared by ``parakeet-server serve``
and ``twistd parakeet``.
"""

import sys
import threading

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from . import __version__
from .models import MODEL_SIZES, PRECISIONS

log = Logger()


def _port(value):
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError("a port is a number from 0 to 65535")
    return port


def positive(kind):
    def coerce(value):
        number = kind(value)
        if number <= 0:
            raise ValueError("must be greater than zero")
        return number
    return coerce


def not_negative(kind):
    def coerce(value):
        number = kind(value)
        if number < 0:
            raise ValueError("must not be negative")
        return number
    return coerce


def _ping_interval(value):
    seconds = float(value)
    if seconds and seconds < 2:
        raise ValueError("must be 0 (no pings) or at least 2 seconds")
    return seconds


def _sample_rate(value):
    rate = int(value)
    if not 8000 <= rate <= 48000:
        raise ValueError("the sample rate must be between 8000 and 48000 Hz")
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


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("Serve streaming speech recognition to TCP (newline-delimited "
                "JSON) and WebSocket clients with an NVIDIA cache-aware streaming "
                "FastConformer RNNT model.")

    optParameters = [
        ("host", None, "0.0.0.0", "Interface to listen on."),
        ("port", None, 8765, "TCP port (newline-delimited JSON); 0 picks a free one.", _port),
        ("ws-port", None, 8000, "WebSocket port (one JSON object per message); "
         "0 picks a free one.", _port),
        ("status-port", None, None, "One-shot status port, off unless given.", _port),
        ("model-size", None, "small",
         "Model to serve: small (%s) or large (%s)."
         % (MODEL_SIZES["small"], MODEL_SIZES["large"]), _model_size),
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
         "with several look-aheads (80, 160, 560 or 1120 for the large model) "
         "[default: the model's own].", positive(int)),
        ("vad-threshold", None, 0.5, "Speech probability (0-1) at which voice activity "
         "detection counts a 32 ms window as speech.", _probability),
        ("vad-min-silence-ms", None, 300, "Milliseconds below the threshold before a "
         "stream's state turns from speech to silence.", not_negative(int)),
        ("eou-silence-ms", None, 800, "Milliseconds without a new token, heard as "
         "silence, that end an utterance (NeMo's stop_history_eou; models with an "
         "<EOU> token usually end it sooner); 0: only <EOU>, flush and the end of the "
         "stream end utterances.", not_negative(int)),
        ("finalize-silence-ms", None, 0, "Finalize a stream after this many ms of "
         "silence following speech (its final result is sent and its slot freed); "
         "0: never, the client decides.", not_negative(int)),
    ]
    optFlags = [
        ("no-vad", None, "No voice activity detection (results carry last_state null)."),
    ]

    def postOptions(self):
        if self["max-batch"] is None:
            self["max-batch"] = self["max-num-streams"]

    def opt_version(self):
        """Print the version and exit."""
        print("parakeet-server %s" % (__version__,))
        sys.exit(0)


def off_main_thread(f, *args, **kwargs):
    """f(*args, **kwargs) on a thread of its own that ends when f returns.

    Loading a model runs torch operators, and the first thread to run one
    keeps a team of OpenMP workers for as long as it lives.  Loaded on the
    main thread (which becomes the reactor's), that team would outlive the
    load and compete with the model thread's own on every step: measured,
    steps took 50 % longer.  A thread that has ended takes its team with it,
    and holds nothing across twistd's fork when it daemonizes."""
    outcome = []

    def run():
        try:
            outcome.append((True, f(*args, **kwargs)))
        except BaseException as e:
            outcome.append((False, e))

    thread = threading.Thread(target=run, name="parakeet-load")
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def load_engine(config):
    """The engine for config; exits with one line if the model cannot be had."""
    from .engine import Engine
    from .models import ModelUnavailable, resolve_model

    name = resolve_model(config["model"], config["model-size"])
    try:
        return off_main_thread(
            Engine.load, name, device=config["device"], num_slots=config["max-num-streams"],
            batch_size=config["max-batch"], chunk_ms=config["chunk-ms"],
            precision=config["precision"])
    except (ModelUnavailable, ValueError) as e:
        sys.stderr.write("parakeet-server: %s\n" % (e,))
        sys.stderr.flush()
        raise SystemExit(1)


def makeService(config, reactor=None, engine=None):
    if reactor is None:
        from twisted.internet import reactor
    from .protocol import Limits
    from .turns import TurnSettings
    from .registry import StreamRegistry
    from .scheduler import DecodeLoop
    from .transports import (
        Listener, StatusFactory, StreamLineFactory, StreamWebSocketFactory, tcp_endpoint)

    log.info("parakeet-server {version} starting: {settings}", version=__version__,
             settings=" ".join("--%s=%s" % (k, config[k]) for k in sorted(config)
                               if k not in ("help", "version")))
    if engine is None:
        engine = load_engine(config)
    log.info("serving {model} on {device} in {precision}: {chunk_ms:.0f} ms chunks, "
             "{rate} Hz model audio", model=engine.model_name, device=engine.device,
             precision=engine.precision,
             chunk_ms=engine.geometry.chunk_seconds * 1000, rate=engine.sample_rate)

    engine.endpointing_ms = config["eou-silence-ms"]
    if config["no-vad"]:
        engine.vad = None
    registry = StreamRegistry(config["max-num-streams"], engine.geometry,
                              config["sample-rate"], reactor)
    loop = DecodeLoop(engine, registry, reactor, max_batch=config["max-batch"])
    loop.setName("decoder")
    top = ServerService(registry, loop, config["drain-seconds"])
    loop.setServiceParent(top)
    limits = Limits(max_stream_seconds=config["max-stream-seconds"],
                    max_message_bytes=config["max-message-bytes"],
                    idle_timeout=config["idle-timeout"],
                    max_backlog_seconds=config["max-backlog-seconds"],
                    write_timeout=config["write-timeout"],
                    turns=TurnSettings(config["vad-threshold"], config["vad-min-silence-ms"],
                                       config["finalize-silence-ms"]))
    host = config["host"]
    Listener(reactor, tcp_endpoint(host, config["port"]),
             StreamLineFactory(registry, loop, limits, reactor),
             "TCP clients").setServiceParent(top)
    Listener(reactor, tcp_endpoint(host, config["ws-port"]),
             StreamWebSocketFactory(registry, loop, limits, reactor,
                                    config["ws-ping-interval"]),
             "WebSocket clients").setServiceParent(top)
    if config["status-port"] is not None:
        Listener(reactor, tcp_endpoint(host, config["status-port"]),
                 StatusFactory(registry), "status checks").setServiceParent(top)
    return top


class ServerService(service.MultiService):
    """The server: on stop, it drains its streams before its ports close, so
    that clients connecting meanwhile are told the server is shutting down."""

    def __init__(self, registry, loop, drain_seconds):
        service.MultiService.__init__(self)
        self.registry = registry
        self.loop = loop
        self.drain_seconds = drain_seconds
        self._stopping = None

    def startService(self):
        self._stopping = None
        service.MultiService.startService(self)

    def stopService(self):
        """Drain, then stop; a second call while stopping waits for the first."""
        if self._stopping is None:
            self._stopping = self._stop()
        return self._stopping

    @defer.inlineCallbacks
    def _stop(self):
        yield self.loop.drain(self.drain_seconds)
        yield service.MultiService.stopService(self)
