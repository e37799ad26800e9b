"""
Running servers for the tests: a served tiny model on loopback ports
(:class:`ServerTestMixin`), ``parakeet-server`` and ``twistd`` as real
processes (:func:`spawn`), reading the status ports and Prometheus metrics,
client messages, and self-signed TLS certificates.
"""

import base64
import datetime
import ipaddress
import json
import os
import re
import sys

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.web.test.requesthelper import DummyRequest

from parakeet.audio import encode_samples
from parakeet.clients import connection
from parakeet.server import tap

from .models import assert_engine_idle, shared_tiny_engine


PIECE = 1600  # 100 ms of audio per message


def wait_for(predicate, timeout=30.0, interval=0.01):
    """A Deferred that fires once predicate() is true; fails after timeout seconds."""
    deadline = reactor.seconds() + timeout

    @defer.inlineCallbacks
    def poll():
        while not predicate():
            if reactor.seconds() > deadline:
                raise AssertionError("timed out waiting for %r" % (predicate,))
            yield task.deferLater(reactor, interval, lambda: None)

    return poll()


def read_line(port):
    """What a loopback port writes before it closes the connection."""
    from twisted.internet import endpoints, protocol

    done = defer.Deferred()

    class Reader(protocol.Protocol):
        data = b""

        def dataReceived(self, data):
            self.data += data

        def connectionLost(self, reason):
            done.callback(self.data)

    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    endpoints.connectProtocol(endpoint, Reader())
    return done


def read_status(port):
    """The one line the status port writes."""
    return read_line(port).addCallback(lambda data: json.loads(data.decode()))


class ServerTestMixin:
    """Starts the server on free loopback ports; subclasses pick a transport."""

    def start_server(self, *flags, engine=None):
        options = tap.Options()
        options.parseOptions(["--host", "127.0.0.1", "--port", "0", "--ws-port", "0",
                              "--status-port", "0"] + list(flags))
        self.engine = engine or shared_tiny_engine()
        # The server's --eou-silence-ms sets the engine's; put it back.
        self.addCleanup(setattr, self.engine, "endpointing_ms", self.engine.endpointing_ms)
        self.server = tap.makeService(options, reactor, engine=self.engine)
        self.server.startService()
        self.addCleanup(self.stop_server)
        self.ports = {name: self.server.getServiceNamed(name).port.getHost().port
                      for name in ("TCP clients", "WebSocket clients", "status checks")}
        return self.server

    @defer.inlineCallbacks
    def stop_server(self):
        # Streams of clients that went away are still being decoded to their end.
        yield wait_for(lambda: len(self.server.registry) == 0)
        yield self.server.stopService()
        assert_engine_idle(self, self.engine)

    def address(self):
        if self.transport == "tcp":
            return "tcp://127.0.0.1:%d" % (self.ports["TCP clients"],)
        return "ws://127.0.0.1:%d" % (self.ports["WebSocket clients"],)

    @defer.inlineCallbacks
    def connect(self):
        client = yield connection.connect(reactor, self.address())
        self.addCleanup(self._hang_up, client)
        return client

    def _hang_up(self, client):
        if not client.closed.called:
            client.disconnect()
        return client.closed

    def status(self):
        return read_status(self.ports["status checks"])

    @defer.inlineCallbacks
    def stream(self, client, audio, piece=PIECE, encoding="pcm16"):
        """Send audio in pieces, the last with final: true; the final result."""
        yield client.next(lambda m: m["type"] == "hello")
        for start in range(0, len(audio), piece):
            client.send_audio(audio[start:start + piece], encoding=encoding,
                              final=start + piece >= len(audio))
        final = yield client.final()
        return final

    def assertResultsConsistent(self, client):
        """Aligned tokens and confidences; one final result, the last."""
        results = client.results()
        self.assertEqual([r["is_final"] for r in results],
                         [False] * (len(results) - 1) + [True])
        said = ("pause", None)
        for r in results:
            self.assertEqual(set(r) - {"utterance"},
                             {"type", "stream_id", "text", "token_ids", "confidence_scores",
                              "is_final", "audio_ms", "turn_detection", "last_state"})
            self.assertEqual(len(r["token_ids"]), len(r["confidence_scores"]))
            for c in r["confidence_scores"]:
                self.assertTrue(0.0 <= c <= 1.0, c)
            turn = (r["turn_detection"], r["last_state"])
            if not r["is_final"] and not r["token_ids"]:
                # A result without tokens says something new about the turn.
                self.assertTrue("utterance" in r or turn != said, r)
            said = turn
        return [t for r in results for t in r["token_ids"]]

    def tokenizer(self):
        return self.engine.pipeline.tokenizer


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


BIN = os.path.dirname(sys.executable)


def environment(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", HF_HOME=os.path.abspath("hf-home"))
    env.update(extra)
    return env


class Process(protocol.ProcessProtocol):
    """A child process whose output is kept; ``ended`` fires with its exit code."""

    def __init__(self):
        self.out = b""
        self.err = b""
        self.ended = defer.Deferred()
        self._watchers = []

    def outReceived(self, data):
        self.out += data
        for pattern, d in list(self._watchers):
            match = re.search(pattern, self.out)
            if match:
                self._watchers.remove((pattern, d))
                d.callback(match)

    def errReceived(self, data):
        self.err += data

    def wait_for_output(self, pattern):
        d = defer.Deferred()
        self._watchers.append((pattern, d))
        self.outReceived(b"")
        return d

    def processEnded(self, reason):
        for _, d in self._watchers:
            d.errback(AssertionError("exited first; output:\n%s\n%s"
                                     % (self.out.decode(), self.err.decode())))
        self._watchers = []
        self.ended.callback(reason.value.exitCode if reason.value.signal is None
                            else "signal %d" % reason.value.signal)


def free_ports(count):
    """count TCP ports free on the loopback interface right now."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def spawn(test, argv, **env):
    proc = Process()
    transport = reactor.spawnProcess(proc, argv[0], argv, env=environment(**env), path=ROOT)

    def kill():
        if not proc.ended.called:
            transport.signalProcess("KILL")
        return proc.ended

    test.addCleanup(kill)
    return proc, transport


def make_certificate(directory, names=("localhost",), addresses=("127.0.0.1", "::1")):
    """A self-signed certificate and its key for names and addresses, written
    to directory: (certificate path, key path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    alternatives = ([x509.DNSName(n) for n in names]
                    + [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256()))
    os.makedirs(directory, exist_ok=True)
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


def audio_json(samples=None, encoding="pcm16", final=None, data=None):
    obj = {"type": "audio", "encoding": encoding}
    if data is None:
        data = base64.b64encode(encode_samples(samples, encoding)).decode()
    obj["data"] = data
    if final is not None:
        obj["final"] = final
    return json.dumps(obj)


def parse(text):
    """Samples of a scrape: {(name, sorted label items): value}."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def scrape(metrics):
    """The metrics resource rendered for one request: (samples, content type)."""
    request = DummyRequest([b""])
    body = metrics.resource().render(request)
    content_type = request.responseHeaders.getRawHeaders(b"content-type")[0]
    return parse(body.decode("utf-8")), content_type


class Scraped:
    """One scrape's samples, read by name and labels."""

    def __init__(self, samples):
        self.samples = samples

    def __call__(self, name, **labels):
        return self.samples[name, tuple(sorted(labels.items()))]

    def has(self, name, **labels):
        return (name, tuple(sorted(labels.items()))) in self.samples


def ssl_endpoint(cert, key):
    return "ssl:0:interface=127.0.0.1:privateKey=%s:certKey=%s" % (
        endpoints.quoteStringArgument(key), endpoints.quoteStringArgument(cert))
