"""
Headless Chromium driven over the DevTools protocol, from Twisted: for the
browser page's test (tests/test_browser.py) and its screenshot
(tools/screenshot_page.py).

The protocol runs over a pipe (``--remote-debugging-pipe``: commands on the
browser's fd 3, replies and events on its fd 4, each a JSON object ended by
a NUL byte), so no port is opened.  Chromium's fake microphone can play a
WAV file into the page (``--use-file-for-fake-audio-capture``) once, and the
permission prompt is answered yes.

    browser = yield Browser.launch(reactor, profile_dir, microphone="speech.wav")
    page = yield browser.open("http://127.0.0.1:8080/")
    yield page.evaluate("document.getElementById('start').click()")
    yield page.wait_for("document.body.dataset.state === 'done'")
    yield page.screenshot("page.png")
    yield browser.close()
"""

import base64
import json
import os
import shutil

from twisted.internet import defer, error, protocol, task

#: Where Debian's chromium package puts it, and other names it goes by.
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium():
    """The path of a Chromium executable, or None."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class DevToolsError(Exception):
    """A command failed, or the browser went away."""


class _Pipe(protocol.ProcessProtocol):
    """The browser process and its DevTools pipe."""

    def __init__(self):
        self._buffer = b""
        self._next_id = 0
        self._pending = {}
        self.listeners = []     # called with every event (a dict)
        self.stderr = b""
        self.ended = defer.Deferred()

    def command(self, method, params=None, session=None):
        """A Deferred firing with the command's result."""
        if self.ended.called:
            return defer.fail(DevToolsError("the browser has exited: %s" % (self.tail(),)))
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        d = defer.Deferred()
        self._pending[self._next_id] = (method, d)
        self.transport.writeToChild(3, json.dumps(message).encode("utf-8") + b"\0")
        return d

    def childDataReceived(self, fd, data):
        if fd == 4:
            self._buffer += data
            *messages, self._buffer = self._buffer.split(b"\0")
            for raw in messages:
                self._dispatch(json.loads(raw))
        elif fd == 2:
            self.stderr = (self.stderr + data)[-20000:]

    def _dispatch(self, message):
        if "id" in message:
            method, d = self._pending.pop(message["id"], (None, None))
            if d is None:
                return
            if "error" in message:
                d.errback(DevToolsError("%s: %s" % (method, message["error"].get("message"))))
            else:
                d.callback(message.get("result", {}))
        else:
            for listener in list(self.listeners):
                listener(message)

    def tail(self):
        return self.stderr.decode("utf-8", "replace")[-2000:]

    def processEnded(self, reason):
        pending, self._pending = self._pending, {}
        for method, d in pending.values():
            d.errback(DevToolsError("the browser exited during %s: %s" % (method, self.tail())))
        self.ended.callback(reason.value.exitCode)


class Browser:

    def __init__(self, reactor, pipe, process):
        self.reactor = reactor
        self.pipe = pipe
        self.process = process

    @classmethod
    @defer.inlineCallbacks
    def launch(cls, reactor, profile_dir, microphone=None, args=(), executable=None,
               width=1000, height=720, allow_microphone=True):
        """Start headless Chromium with its profile in profile_dir; microphone:
        a WAV file the fake microphone plays once, then silence; args: more
        command-line switches; allow_microphone: whether pages asking for the
        microphone get it without a prompt (else they are refused)."""
        executable = executable or find_chromium()
        if executable is None:
            raise DevToolsError("no Chromium found (looked for %s)" % (", ".join(CANDIDATES),))
        argv = [executable, "--headless", "--remote-debugging-pipe",
                "--user-data-dir=" + profile_dir, "--no-first-run",
                "--no-default-browser-check", "--disable-gpu", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-dev-shm-usage", "--mute-audio",
                "--hide-scrollbars", "--force-device-scale-factor=1",
                "--window-size=%d,%d" % (width, height),
                "--autoplay-policy=no-user-gesture-required",
                "--use-fake-device-for-media-stream"]
        if allow_microphone:
            argv.append("--use-fake-ui-for-media-stream")
        if microphone is not None:
            argv.append("--use-file-for-fake-audio-capture=%s%%noloop"
                        % (os.path.abspath(microphone),))
        if os.geteuid() == 0:
            # Chromium refuses to run as root inside its sandbox.
            argv.append("--no-sandbox")
        argv += list(args)
        argv.append("about:blank")
        pipe = _Pipe()
        process = reactor.spawnProcess(pipe, executable, argv, env=dict(os.environ),
                                       childFDs={0: "w", 1: "r", 2: "r", 3: "w", 4: "r"})
        browser = cls(reactor, pipe, process)
        try:
            yield pipe.command("Browser.getVersion")
        except Exception:
            yield browser.close()
            raise
        return browser

    @defer.inlineCallbacks
    def open(self, url):
        """A new tab showing url, once it has loaded: a Page."""
        target = yield self.pipe.command("Target.createTarget", {"url": "about:blank"})
        attached = yield self.pipe.command("Target.attachToTarget",
                                           {"targetId": target["targetId"], "flatten": True})
        page = Page(self, attached["sessionId"])
        yield page.command("Page.enable")
        yield page.command("Runtime.enable")
        yield page.navigate(url)
        return page

    @defer.inlineCallbacks
    def close(self):
        """Ask the browser to quit; kill it if it does not."""
        if self.pipe.ended.called:
            return
        try:
            yield self.pipe.command("Browser.close")
        except DevToolsError:
            pass
        killer = self.reactor.callLater(10, self._kill)
        yield self.pipe.ended
        if killer.active():
            killer.cancel()

    def _kill(self):
        try:
            self.process.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass


class Page:
    """One tab; console messages and uncaught exceptions are kept in ``log``."""

    def __init__(self, browser, session):
        self.browser = browser
        self.session = session
        self.log = []
        self._loaded = []
        browser.pipe.listeners.append(self._event)

    def command(self, method, params=None):
        return self.browser.pipe.command(method, params, self.session)

    def _event(self, message):
        if message.get("sessionId") != self.session:
            return
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled":
            self.log.append("console.%s: %s" % (params.get("type"), " ".join(
                str(a.get("value", a.get("description", ""))) for a in params.get("args", []))))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.log.append("exception: %s" % (
                details.get("exception", {}).get("description") or details.get("text"),))
        elif method == "Page.loadEventFired":
            loaded, self._loaded = self._loaded, []
            for d in loaded:
                d.callback(None)

    @defer.inlineCallbacks
    def navigate(self, url):
        loaded = defer.Deferred()
        self._loaded.append(loaded)
        result = yield self.command("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise DevToolsError("cannot load %s: %s" % (url, result["errorText"]))
        yield loaded

    @defer.inlineCallbacks
    def evaluate(self, expression):
        """The value of a JavaScript expression (awaited if a promise), run
        as if the user had acted (a click may start audio)."""
        result = yield self.command("Runtime.evaluate", {
            "expression": expression, "returnByValue": True, "awaitPromise": True,
            "userGesture": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise DevToolsError("%s: %s" % (expression, details.get("exception", {}).get(
                "description") or details.get("text")))
        return result["result"].get("value")

    @defer.inlineCallbacks
    def wait_for(self, expression, timeout=60.0, interval=0.1):
        """Poll until expression is truthy; its value.  Fails after timeout
        seconds, with the page's log."""
        reactor = self.browser.reactor
        deadline = reactor.seconds() + timeout
        while True:
            value = yield self.evaluate(expression)
            if value:
                return value
            if reactor.seconds() > deadline:
                raise DevToolsError("timed out waiting for %s; page log:\n%s"
                                    % (expression, "\n".join(self.log)))
            yield task.deferLater(reactor, interval, lambda: None)

    @defer.inlineCallbacks
    def screenshot(self, path):
        """Save the whole page as a PNG."""
        metrics = yield self.command("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        shot = yield self.command("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"],
                     "scale": 1}})
        with open(path, "wb") as f:
            f.write(base64.b64decode(shot["data"]))
