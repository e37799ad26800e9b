"""
What operators and load balancers see: listening on endpoint strings, the
server's states (loading, ready, full, draining) on the status port, the
HAProxy agent-check port and the HTTP probes, metrics over HTTP, and the
stream WebSocket on the HTTP port.
"""

import json
import threading

from twisted.internet import defer, reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

from parakeet.clients import connection
from parakeet.server import health, tap
from parakeet.server.registry import StreamRegistry

from .support.models import GEOMETRY, shared_tiny_engine, speechlike
from .support.servers import Scraped, ServerTestMixin, parse, read_line, wait_for


@defer.inlineCallbacks
def http_get(port, path):
    """(status code, body) of GET path on the loopback port."""
    response = yield Agent(reactor).request(
        b"GET", b"http://127.0.0.1:%d%s" % (port, path.encode()))
    body = yield readBody(response)
    return response.code, body


class HealthTests(unittest.TestCase):
    """The states and what each probe says of them."""

    def setUp(self):
        self.registry = StreamRegistry(4, None, 16000, MemoryReactorClock())
        self.health = health.Health(self.registry)

    def open(self):
        return self.registry.open("peer", "tcp", None)

    def test_states(self):
        self.assertEqual(self.health.state, "loading")
        self.assertFalse(self.health.ready)
        self.assertEqual(self.health.agent_reply(), "down #loading the model\n")
        self.registry.geometry = GEOMETRY
        self.health.loaded = True
        self.assertEqual(self.health.state, "ready")
        self.assertTrue(self.health.ready)
        self.assertEqual(self.health.agent_reply(), "up ready 100% maxconn:4\n")
        streams = [self.open() for _ in range(3)]
        self.assertEqual(self.health.agent_reply(), "up ready 25% maxconn:4\n")
        self.assertEqual(self.health.status(), {"type": "status", "connected_streams": 3,
                                                "max_streams": 4, "state": "ready"})
        streams.append(self.open())
        self.assertEqual(self.health.state, "full")
        self.assertFalse(self.health.ready)
        self.assertEqual(self.health.agent_reply(), "up ready 0% maxconn:4\n")
        self.registry.release(streams[0])
        self.assertTrue(self.health.ready)
        self.registry.closed = True
        self.assertEqual(self.health.state, "draining")
        self.assertEqual(self.health.agent_reply(), "drain #shutting down\n")
        self.assertEqual(self.health.status()["state"], "draining")

    def test_a_free_slot_keeps_some_weight(self):
        registry = StreamRegistry(300, GEOMETRY, 16000, MemoryReactorClock())
        check = health.Health(registry, loaded=True)
        for _ in range(299):
            registry.open("peer", "tcp", None)
        self.assertEqual(check.agent_reply(), "up ready 1% maxconn:300\n")


class ListenOptionTests(unittest.TestCase):

    def parse(self, *argv):
        options = tap.Options()
        options.parseOptions(list(argv))
        return options

    def test_ports_by_default(self):
        options = self.parse("--host", "::1", "--port", "1", "--http-port", "3")
        self.assertEqual(options.endpoints("tcp"), ["tcp:1:interface=\\:\\:1"])
        self.assertEqual(options.endpoints("ws"), ["tcp:8000:interface=\\:\\:1"])
        self.assertEqual(options.endpoints("http"), ["tcp:3:interface=\\:\\:1"])
        self.assertEqual(options.endpoints("status"), [])
        self.assertEqual(options.endpoints("agent"), [])

    def test_endpoint_strings_replace_the_port(self):
        options = self.parse("--port", "1", "--listen-tcp", "tcp:0:interface=127.0.0.1",
                             "--listen-tcp", "unix:parakeet.sock",
                             "--listen-agent", "tcp:5555")
        self.assertEqual(options.endpoints("tcp"),
                         ["tcp:0:interface=127.0.0.1", "unix:parakeet.sock"])
        self.assertEqual(options.endpoints("agent"), ["tcp:5555"])

    def test_bad_endpoint_string(self):
        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--listen-ws", "nonsense:1")
        self.assertIn("--listen-ws nonsense:1", str(caught.exception))
        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--listen-http", "ssl:0:privateKey=missing.pem")
        self.assertIn("--listen-http ssl:0:privateKey=missing.pem", str(caught.exception))


class OperatingTests(ServerTestMixin, unittest.TestCase):
    """A live server with every port on: probes follow its state."""

    transport = "tcp"

    def setUp(self):
        self.start_server("--max-num-streams", "2", "--http-port", "0", "--agent-port", "0",
                          "--listen-tcp", "tcp:0:interface=127.0.0.1",
                          "--listen-tcp", "tcp:0:interface=127.0.0.1")
        self.http = self.server.getServiceNamed("HTTP").port.getHost().port
        self.agent = self.server.getServiceNamed("HAProxy agent checks").port.getHost().port

    @defer.inlineCallbacks
    def probes(self):
        healthz, _ = yield http_get(self.http, "/healthz")
        readyz, body = yield http_get(self.http, "/readyz")
        agent = yield read_line(self.agent)
        return healthz, readyz, json.loads(body)["state"], agent.decode()

    @defer.inlineCallbacks
    def test_probes_follow_the_state(self):
        self.assertEqual((yield self.probes()), (200, 200, "ready", "up ready 100% maxconn:2\n"))
        first = yield connection.connect(reactor, self.address())
        second = yield connection.connect(reactor, self.address())
        yield first.next()
        yield second.next()
        self.assertEqual((yield self.probes()), (200, 503, "full", "up ready 0% maxconn:2\n"))
        first.send_audio(speechlike(1, 0.5), final=True)
        yield first.closed
        yield wait_for(lambda: len(self.server.registry) == 1)
        self.assertEqual((yield self.probes()), (200, 200, "ready", "up ready 50% maxconn:2\n"))
        # Draining: the open stream is finalized; probes say so meanwhile.
        self.server.registry.closed = True
        self.assertEqual((yield self.probes()), (200, 503, "draining", "drain #shutting down\n"))
        self.server.registry.closed = False
        second.close()
        yield second.closed

    @defer.inlineCallbacks
    def test_every_listener_serves(self):
        ports = [self.server.getServiceNamed(name).port.getHost().port
                 for name in ("TCP clients", "TCP clients (2)")]
        for port in ports:
            client = yield connection.connect(reactor, "tcp://127.0.0.1:%d" % port)
            self.assertEqual((yield client.next())["type"], "hello")
            client.send_audio(speechlike(2, 0.4), final=True)
            yield client.final()
            yield client.closed

    @defer.inlineCallbacks
    def test_websocket_on_the_http_port(self):
        client = yield connection.connect(reactor, "ws://127.0.0.1:%d/ws?sample_rate=8000"
                                       % (self.http,))
        hello = yield client.next()
        self.assertEqual(hello["sample_rate"], 8000)
        client.send_audio(speechlike(3, 1.0)[::2], final=True)
        final = yield client.final()
        yield client.closed
        self.assertTrue(final["is_final"])
        self.assertEqual(client.errors(), [])

    @defer.inlineCallbacks
    def test_metrics_over_http(self):
        client = yield connection.connect(reactor, self.address())
        yield client.next()
        client.send_audio(speechlike(4, 1.0), final=True)
        yield client.final()
        code, body = yield http_get(self.http, "/metrics")
        self.assertEqual(code, 200)
        m = Scraped(parse(body.decode()))
        self.assertEqual(m("parakeet_streams_opened_total", transport="tcp"), 1)
        self.assertEqual(m("parakeet_streams_capacity"), 2)
        self.assertGreaterEqual(m("parakeet_decoded_audio_seconds_total"), 0.9)
        yield client.closed

    @defer.inlineCallbacks
    def test_unknown_path(self):
        code, _ = yield http_get(self.http, "/nothing-here")
        self.assertEqual(code, 404)


class LoadingTests(unittest.TestCase):
    """Until the model is loaded, the ports answer and streams are refused."""

    @defer.inlineCallbacks
    def test_loading_then_ready(self):
        engine = shared_tiny_engine()
        settings = (engine.vad, engine.endpointing_ms)
        self.addCleanup(setattr, engine, "vad", settings[0])
        self.addCleanup(setattr, engine, "endpointing_ms", settings[1])
        release = threading.Event()
        self.addCleanup(release.set)

        def load(config):
            release.wait(30)
            return engine

        self.patch(tap, "load_engine", load)
        options = tap.Options()
        options.parseOptions(["--host", "127.0.0.1", "--port", "0", "--ws-port", "0",
                              "--status-port", "0", "--http-port", "0",
                              "--agent-port", "0"])
        server = tap.makeService(options, reactor)
        server.startService()
        self.addCleanup(server.stopService)
        port = {name: server.getServiceNamed(name).port.getHost().port
                for name in ("TCP clients", "WebSocket clients", "status checks", "HTTP",
                             "HAProxy agent checks")}
        self.assertEqual((yield http_get(port["HTTP"], "/healthz"))[0], 503)
        self.assertEqual((yield http_get(port["HTTP"], "/readyz"))[0], 503)
        self.assertEqual((yield read_line(port["HAProxy agent checks"])),
                         b"down #loading the model\n")
        status = json.loads((yield read_line(port["status checks"])))
        self.assertEqual(status["state"], "loading")
        for address in ("tcp://127.0.0.1:%d" % port["TCP clients"],
                        "ws://127.0.0.1:%d" % port["WebSocket clients"]):
            client = yield connection.connect(reactor, address)
            yield client.closed
            self.assertEqual(client.errors(), [
                "The server is still loading its model; try again shortly."])
        release.set()
        yield wait_for(lambda: server.health.loaded)
        self.assertEqual((yield http_get(port["HTTP"], "/readyz"))[0], 200)
        client = yield connection.connect(reactor, "tcp://127.0.0.1:%d" % port["TCP clients"])
        self.assertEqual((yield client.next())["type"], "hello")
        client.send_audio(speechlike(5, 0.5), final=True)
        yield client.final()
        yield client.closed
