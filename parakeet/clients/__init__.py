"""
Clients of the server: the connection every one of them uses, reading
audio files, ``parakeet-server transcribe`` and ``parakeet-server bench``.
"""
