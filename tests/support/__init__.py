"""
What the test modules share: models (:mod:`.models`), running servers and
reading what they say (:mod:`.servers`), and fakes of the engine, the decode
loop and a transport (:mod:`.fakes`).
"""
