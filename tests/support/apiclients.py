"""
The clients of other APIs the tests drive the server with (the ``openai``
and ``deepgram-sdk`` packages of the ``test`` extra), pointed at a server's
HTTP port, closed when the test ends; and WAV bytes to send them.
"""

import io
import warnings

from twisted.trial import unittest


def wav_bytes(audio, rate=16000):
    import soundfile

    out = io.BytesIO()
    soundfile.write(out, audio, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def need_clients():
    """SkipTest unless both client libraries are installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import deepgram
        import openai
    except ImportError as e:
        raise unittest.SkipTest("the API client libraries are not installed: %s" % (e,))
    del deepgram, openai


def openai_client(test, port, key="x", scheme="http", **options):
    import openai

    client = openai.OpenAI(api_key=key, base_url="%s://127.0.0.1:%d/v1" % (scheme, port),
                           websocket_base_url="ws://127.0.0.1:%d/v1" % port,
                           max_retries=0, **options)
    # Its connection pool keeps connections open; the server's must close.
    test.addCleanup(client.close)
    return client


def deepgram_client(test, port, key="x"):
    import httpx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from deepgram import DeepgramClient
        from deepgram.environment import DeepgramClientEnvironment
    base = "127.0.0.1:%d" % port
    env = DeepgramClientEnvironment(base="http://" + base, production="ws://" + base,
                                    agent="ws://" + base, agent_rest="http://" + base)
    http = httpx.Client(timeout=60)
    test.addCleanup(http.close)
    return DeepgramClient(api_key=key, environment=env, max_retries=0, httpx_client=http)
