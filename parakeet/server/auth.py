"""
Who may open a stream: bearer tokens from a file (``--auth-tokens``) and the
web origins allowed to open WebSockets (``--allowed-origins``).

Everything here works on values (lines of a file, HTTP header fields, a
client's first message) and needs no socket; the transports call it.

The token file holds one token per line; blank lines and lines starting
with ``#`` are skipped and whitespace around a token is stripped.  The store
keeps only a SHA-256 digest of each token and compares digests with
:func:`hmac.compare_digest`, against every token, so a comparison takes the
same time whatever the token presented and whichever token it matches.

How a client presents its token:

TCP
    Its first line is ``{"type": "auth", "token": "TOKEN"}``.  Until that
    line checks out nothing else is accepted and no stream exists.
WebSocket
    Any of, in this order of precedence: an ``Authorization: Bearer TOKEN``
    header; the subprotocol ``token.TOKEN`` offered together with the
    subprotocol ``parakeet`` (browsers cannot set headers; the server
    selects ``parakeet``, never the token, and a browser fails a connection
    whose offered subprotocols the server selects none of); a ``?token=TOKEN``
    query parameter.
"""

import hashlib
import json
import signal
import threading
from hmac import compare_digest
from urllib.parse import urlsplit

import attr
from twisted.application import service
from twisted.logger import Logger

#: The subprotocol the server selects when a WebSocket client offers it.
SUBPROTOCOL = "parakeet"
#: A WebSocket client offering the subprotocol ``token.TOKEN`` presents TOKEN.
TOKEN_SUBPROTOCOL_PREFIX = "token."

#: What an unauthenticated TCP client must send first.
AUTH_MESSAGE_EXAMPLE = '{"type": "auth", "token": "..."}'

#: The close code of a WebSocket client refused for its token (RFC 6455
#: section 7.4.1: a policy violation).
POLICY_VIOLATION = 1008

#: Seconds a TCP client has to authenticate when --idle-timeout is 0.
AUTH_TIMEOUT_SECONDS = 10.0

#: Longest first line read from a TCP client that has not authenticated yet.
MAX_AUTH_LINE_BYTES = 16 * 1024

log = Logger()


class AuthConfigError(Exception):
    """The token file cannot be used; str() names the file and says why."""


def _digest(token):
    if isinstance(token, str):
        token = token.encode("utf-8")
    return hashlib.sha256(token).digest()


def read_tokens(path):
    """The tokens in the file at path, in order; AuthConfigError if it cannot
    be read or holds none."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise AuthConfigError("cannot read the token file %s: %s"
                              % (path, e.strerror or e))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise AuthConfigError("the token file %s is not UTF-8 text" % (path,))
    tokens = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            tokens.append(line)
    if not tokens:
        raise AuthConfigError("the token file %s holds no token (one per line; blank "
                              "lines and lines starting with # are skipped)" % (path,))
    return tokens


class TokenStore:
    """The tokens clients may present, read from a file and re-read on demand."""

    def __init__(self, path):
        """Reads path; AuthConfigError if it cannot be used."""
        self.path = path
        self._digests = ()
        self._set(read_tokens(path))
        log.info("auth: {count} tokens loaded from {path}", count=len(self), path=path)

    def _set(self, tokens):
        self._digests = tuple({_digest(t): None for t in tokens})

    def __len__(self):
        return len(self._digests)

    def check(self, token):
        """Whether token (str, or bytes as sent) is one of the store's.

        Every stored digest is compared, in constant time, whatever matches."""
        if token is None:
            return False
        presented = _digest(token)
        found = False
        for digest in self._digests:
            found |= compare_digest(presented, digest)
        return found

    def reload(self):
        """Re-read the file.  If that fails, the tokens held before stay and
        the error is logged.  Whether it succeeded."""
        try:
            tokens = read_tokens(self.path)
        except AuthConfigError as e:
            log.error("auth: reloading tokens failed, keeping the {count} loaded before: "
                      "{error}", count=len(self), error=str(e))
            return False
        self._set(tokens)
        log.info("auth: {count} tokens loaded from {path}", count=len(self), path=self.path)
        return True


# What clients present

@attr.s(frozen=True, slots=True)
class Refusal:
    """Why a client may not open a stream."""

    #: For the client's ``error`` message.
    message = attr.ib()
    #: A few words, for a WebSocket close frame and the log.
    reason = attr.ib()


MISSING = "missing token"
WRONG = "wrong token"


@attr.s(frozen=True, slots=True)
class Credential:
    """The token a WebSocket client presented, and where it was."""

    token = attr.ib(repr=False)  #: str, or bytes as they came in a header field
    source = attr.ib()          #: "the Authorization header", ...

    def refusal(self, store):
        """None if the token is one of store's, else the Refusal."""
        if store.check(self.token):
            return None
        return Refusal("authentication failed: wrong token (from %s)" % (self.source,),
                       WRONG)


def _header_bytes(value):
    # Autobahn decodes header fields as ISO-8859-1; this gives back the bytes sent.
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


def _authorization(value):
    """(scheme in lower case, token) of an Authorization header field."""
    scheme, _, token = value.strip().partition(" ")
    return scheme.lower(), token.strip()


def token_subprotocols(protocols):
    """The offered subprotocols that carry a token."""
    return [p for p in protocols if p.startswith(TOKEN_SUBPROTOCOL_PREFIX)]


def websocket_credential(headers, params, protocols):
    """The token a WebSocket client presented in its opening handshake, as a
    Credential, or a Refusal if it presented none.

    headers: the request's header fields, names in lower case; params: its
    query, each name to a list of values; protocols: the subprotocols offered."""
    authorization = headers.get("authorization")
    bad_header = None
    if authorization is not None:
        scheme, token = _authorization(authorization)
        if scheme == "bearer" and token:
            return Credential(_header_bytes(token), "the Authorization header")
        bad_header = scheme != "bearer"
    offered = token_subprotocols(protocols)
    if offered and offered[0][len(TOKEN_SUBPROTOCOL_PREFIX):]:
        return Credential(_header_bytes(offered[0][len(TOKEN_SUBPROTOCOL_PREFIX):]),
                          "the subprotocol")
    query = params.get("token")
    if query and query[-1]:
        return Credential(query[-1], "the token query parameter")
    if bad_header:
        return Refusal("authentication required: the Authorization header must be "
                       "'Bearer TOKEN'", MISSING)
    return Refusal("authentication required: missing token (send the header "
                   "'Authorization: Bearer TOKEN', offer the subprotocols '%s' and "
                   "'%sTOKEN', or add ?token=TOKEN to the URL)"
                   % (SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX), MISSING)


#: The subprotocol a browser's OpenAI Realtime client offers its key in.
OPENAI_KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."
#: The subprotocol a browser's Deepgram client offers before its key.
DEEPGRAM_TOKEN_SUBPROTOCOL = "token"


def api_credential(headers, protocols=()):
    """The token a client of OpenAI's or Deepgram's API presented, as a
    Credential, or a Refusal if it presented none.

    headers: the request's header fields, names in lower case.  Either API's
    forms: an ``Authorization: Bearer TOKEN`` or ``Authorization: Token TOKEN``
    header; on a WebSocket, the subprotocol ``openai-insecure-api-key.TOKEN``
    (OpenAI's browser form) or the subprotocols ``token`` and ``TOKEN``
    (Deepgram's)."""
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, token = _authorization(authorization)
        if scheme in ("bearer", "token") and token:
            return Credential(_header_bytes(token), "the Authorization header")
        return Refusal("authentication required: the Authorization header must be "
                       "'Bearer TOKEN' or 'Token TOKEN'", MISSING)
    protocols = list(protocols)
    for protocol in protocols:
        if protocol.startswith(OPENAI_KEY_SUBPROTOCOL_PREFIX):
            return Credential(_header_bytes(protocol[len(OPENAI_KEY_SUBPROTOCOL_PREFIX):]),
                              "the subprotocol")
    if DEEPGRAM_TOKEN_SUBPROTOCOL in protocols:
        rest = protocols[protocols.index(DEEPGRAM_TOKEN_SUBPROTOCOL) + 1:]
        if rest:
            return Credential(_header_bytes(rest[0]), "the subprotocol")
    return Refusal("authentication required: missing token (send the header "
                   "'Authorization: Bearer TOKEN' or 'Authorization: Token TOKEN')", MISSING)


def api_refusal(store, headers, protocols=()):
    """None if a client of another API presents one of store's tokens, or
    the server needs none (store None); else the Refusal."""
    if store is None:
        return None
    credential = api_credential(headers, protocols)
    if isinstance(credential, Refusal):
        return credential
    return credential.refusal(store)


def websocket_refusal(store, headers, params, protocols):
    """None if the handshake presents one of store's tokens, else the Refusal."""
    credential = websocket_credential(headers, params, protocols)
    if isinstance(credential, Refusal):
        return credential
    return credential.refusal(store)


def auth_message_token(line):
    """The token of a TCP client's auth message (a line, bytes), or a Refusal
    if the line is no auth message or has no token."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        obj = None
    if not isinstance(obj, dict) or obj.get("type") != "auth":
        return Refusal("authentication required: the first message must be %s"
                       % (AUTH_MESSAGE_EXAMPLE,), "no auth message")
    token = obj.get("token")
    if not isinstance(token, str) or not token:
        return Refusal("authentication failed: the auth message has no token "
                       "(expected %s)" % (AUTH_MESSAGE_EXAMPLE,), MISSING)
    return token


def is_auth_message(line):
    """Whether a line is an auth message (which a server without
    authentication accepts and ignores)."""
    return b'"auth"' in line and not isinstance(auth_message_token(line), Refusal)


def tcp_refusal(store, line):
    """None if the line is an auth message with one of store's tokens, else the Refusal."""
    token = auth_message_token(line)
    if isinstance(token, Refusal):
        return token
    if store.check(token):
        return None
    return Refusal("authentication failed: wrong token", WRONG)


# Origins

def normalize_origin(origin):
    """An origin (``scheme://host[:port]``) in one spelling: lower case, no
    default port, no path.  ValueError if it is not one."""
    origin = origin.strip()
    if origin.lower() == "null":
        return "null"
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        raise ValueError("not an origin: %r" % (origin[:100],))
    scheme = parts.scheme.lower()
    host = parts.hostname
    if not scheme or not host or parts.path not in ("", "/") or parts.query:
        raise ValueError("not an origin (scheme://host[:port]): %r" % (origin[:100],))
    if port == {"http": 80, "https": 443}.get(scheme):
        port = None
    if ":" in host:
        host = "[%s]" % (host,)
    return "%s://%s%s" % (scheme, host, "" if port is None else ":%d" % (port,))


def parse_origins(text):
    """A comma-separated list of origins to a frozenset of normalized ones;
    ValueError if any is not an origin or there are none."""
    origins = frozenset(normalize_origin(o) for o in text.split(",") if o.strip())
    if not origins:
        raise ValueError("no origin given")
    return origins


def origin_allowed(allowed, origin):
    """Whether a handshake whose Origin header is origin ("" or None: none) may
    proceed; allowed: normalized origins, or None for any."""
    if allowed is None or not origin:
        return True
    try:
        return normalize_origin(origin) in allowed
    except ValueError:
        return False


# Reloading

class TokenReloader(service.Service):
    """Re-reads the token store on SIGHUP while it runs.

    The handler is installed only on the main thread (where Python delivers
    signals); the reload itself runs on the reactor thread.  reload() can be
    called directly too."""

    name = "auth tokens"

    def __init__(self, store, reactor):
        self.store = store
        self.reactor = reactor
        self._previous = None
        self._installed = False

    def startService(self):
        service.Service.startService(self)
        if (hasattr(signal, "SIGHUP")
                and threading.current_thread() is threading.main_thread()):
            self._previous = signal.signal(signal.SIGHUP, self._signalled)
            self._installed = True

    def stopService(self):
        if self._installed:
            previous = self._previous
            signal.signal(signal.SIGHUP, signal.SIG_DFL if previous is None else previous)
            self._installed = False
            self._previous = None
        return service.Service.stopService(self)

    def _signalled(self, signum, frame):
        self.reactor.callFromThread(self.reload)

    def reload(self):
        log.info("auth: reloading tokens from {path}", path=self.store.path)
        return self.store.reload()
