"""
Inverse text normalisation: an utterance's spoken words to the words people
write ("seven thirty" to "07:30", "two nine three four zero" to "29340"),
each written word keeping the times of the spoken words it stands for.

NeMo's serving pipeline applies ITN only to its own finals, and only through
its step's return value; the server finds utterances itself
(``parakeet.server.turns``), so it calls NeMo's alignment-preserving
normaliser (``nemo.collections.asr.inference.itn``, over
``nemo_text_processing``'s English grammars) on each utterance's words
instead.  Building the grammars takes a few seconds the first time; they
are cached as a ``.far`` file in ``cache_dir``.
"""

import os

#: Where the compiled grammars are cached unless told otherwise.
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "parakeet-server", "itn")


def unsupported_reason():
    """Why ITN cannot run here, or None (without importing anything)."""
    from importlib.util import find_spec

    missing = [name for name in ("nemo_text_processing", "pynini") if find_spec(name) is None]
    if missing:
        return ("inverse text normalisation needs %s (pip install 'parakeet-server[itn]')"
                % (" and ".join(missing),))
    return None


def written_words(words, spoken, written, alignment):
    """The written words of an utterance: words, its spoken words as the
    turns give them (``word``, ``start_ms``, ``end_ms``, ``confidence``);
    spoken and written, the normaliser's words; alignment, its spans
    ``([spoken indices], [written indices], class)``.  Each span becomes one
    written word (``"07:30 a.m."``) with the first spoken word's start, the
    last one's end, their mean confidence, and the spoken words it stands
    for in ``spoken``."""
    out = []
    for source, target, _ in alignment:
        said = [words[i] for i in source]
        text = " ".join(written[i] for i in target)
        word = {"word": text, "start_ms": said[0]["start_ms"], "end_ms": said[-1]["end_ms"],
                "confidence": round(sum(w["confidence"] for w in said) / len(said), 4)}
        spoken_text = " ".join(spoken[i] for i in source)
        if spoken_text != text:
            word["spoken"] = spoken_text
        out.append(word)
    return out


class Normalizer:
    """English ITN over whole utterances; not thread-safe: one caller at a time."""

    def __init__(self, cache_dir=DEFAULT_CACHE_DIR):
        reason = unsupported_reason()
        if reason is not None:
            raise RuntimeError(reason)
        os.makedirs(cache_dir, exist_ok=True)
        from nemo.collections.asr.inference.itn import inverse_normalizer

        # NeMo keeps every text it tags in a process-wide dictionary (shared
        # through a multiprocessing manager), never emptied: a server would
        # grow without bound.  Keep a bounded one of our own.
        inverse_normalizer.IN_MEM_CACHE = _Bounded(20000)
        self._itn = inverse_normalizer.AlignmentPreservingInverseNormalizer(
            lang="en", cache_dir=cache_dir)

    def utterance(self, words):
        """The written words of an utterance's spoken words (see written_words)."""
        if not words:
            return []
        spoken, written, alignment = self._itn.get_word_alignment(
            [w["word"] for w in words], " ")
        return written_words(words, spoken, written, alignment)


class _Bounded(dict):
    """A dictionary that forgets everything once it holds limit entries."""

    def __init__(self, limit):
        dict.__init__(self)
        self.limit = limit

    def __setitem__(self, key, value):
        if len(self) >= self.limit:
            self.clear()
        dict.__setitem__(self, key, value)
