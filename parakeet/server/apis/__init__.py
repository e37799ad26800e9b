"""
Other services' APIs on the HTTP port, decoded by the same engine, slots,
limits, authentication, metrics and drain as native streams: OpenAI's
Realtime transcription sessions and audio transcriptions, Deepgram's live
and pre-recorded transcription.  docs/apis.rst maps their fields.

Each live API puts a :class:`~parakeet.server.protocol.StreamSession`
behind a channel that translates: the session speaks the native protocol
(results with turns and words), the channel turns its messages into the
API's events, and the API's client events into the session's calls.
"""
