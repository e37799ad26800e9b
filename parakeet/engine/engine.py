"""
The model side of the server: one batched decoding step over many streams.

Everything here runs on the model thread, never on the reactor thread.
"""

import numpy as np
import torch
from twisted.logger import Logger

from ..checkpoints import PRECISIONS
from ..contract import EOU, ChunkGeometry, StepResult, piece_text
from .allocator import keep_cpu_kernels
from .nemo.loading import quiet_nemo

#: How much key terms are favoured by default: the boosting tree's alpha,
#: added to the log-probabilities of the terms' tokens.  (On the demo model
#: 1 mends "three twenty am" into a key term "three thirty one"; with ten
#: single names as key terms, 1 left names said and false alarms nearly as
#: they were, and 4 put names where none was said in most clips:
#: docs/serving.rst.)
KEYTERM_WEIGHT = 1.0

log = Logger()

def parse_device(device):
    """``cpu``, ``cuda`` or ``cuda:N`` (None: cuda when available) -> (kind, index)."""
    if device is None:
        if torch.cuda.is_available():
            device = "cuda"
        else:
            device = "cpu"
            log.warn("CUDA is not available: running the model on the CPU")
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise ValueError("unknown device %r (use cpu, cuda or cuda:N)" % (device,))
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device %r requested but CUDA is not available" % (device,))
    return kind, int(index or 0)


class Engine:
    """A served model: chunk geometry, feature extraction and the batched step."""

    def __init__(self, pipeline, model_name, precision="float32", vad=None):
        """vad: a :class:`parakeet.engine.vad.VoiceActivity`, or None for none."""
        self.pipeline = pipeline
        self.vad = vad
        self.model_name = model_name
        self.precision = precision
        self.device = pipeline.device
        cfg = pipeline.asr_model.asr_model.encoder.streaming_cfg
        featurizer = pipeline.preprocessor.featurizer
        if getattr(featurizer, "frame_splicing", 1) != 1:
            raise ValueError("models with frame splicing cannot be streamed")
        chunk, cache = cfg.chunk_size, cfg.pre_encode_cache_size
        if not isinstance(chunk, (list, tuple)):
            chunk, cache = [chunk, chunk], [cache, cache]
        pad = featurizer.stft_pad_amount
        self.geometry = ChunkGeometry(
            hop=featurizer.hop_length, n_fft=featurizer.n_fft,
            pad=featurizer.n_fft // 2 if pad is None else pad,
            first_frames=chunk[0], chunk_frames=chunk[1], cache_frames=cache[1],
            sample_rate=pipeline.sample_rate)
        self._first_cache_frames = cache[0]
        self._n_features = pipeline.asr_model.get_input_features()
        self._feature_cache = {}
        self._pieces = pipeline.tokenizer.ids_to_tokens
        #: The model's end-of-utterance token, if it has one.
        self.eou_id = None
        vocabulary = pipeline.asr_model.tokenizer.vocab
        if EOU in vocabulary:
            self.eou_id = pipeline.asr_model.tokenizer.token_to_id(EOU)
        #: Milliseconds of audio per encoder frame.
        self.frame_ms = pipeline.asr_model.get_model_stride(in_milliseconds=True)
        from .nemo.pipeline import ASRRequestOptions, FeatureBuffer

        self._feature_buffer = FeatureBuffer
        self._request_options = ASRRequestOptions
        self.endpointing_ms = 0
        #: How much a stream's key terms are favoured (the boosting tree's alpha).
        self.keyterm_weight = KEYTERM_WEIGHT
        #: The language codes a multilingual model takes; empty for a model
        #: of one language (English, for every other model served).
        self.languages = pipeline.languages
        #: The language of streams that name none: ``auto`` (the model
        #: picks, and tags what it heard) where the model offers it.
        self.default_language = None
        if self.languages:
            self.default_language = "auto" if "auto" in self.languages else self.languages[0]
        from .nemo.pipeline import chunk_choices

        #: The chunk lengths the model was trained for, in ms.
        self.chunk_sizes_ms = tuple(sorted(chunk_choices(pipeline.asr_model)))

    @property
    def endpointing_ms(self):
        """Milliseconds of blank output after speech at which NeMo's
        endpointing (``stop_history_eou``) reports an end of utterance, for
        streams that start from now on; 0: never."""
        return self._endpointing_ms

    @endpointing_ms.setter
    def endpointing_ms(self, ms):
        self._endpointing_ms = ms
        self._options = self._request_options(stop_history_eou=ms if ms > 0 else -1)

    @classmethod
    def load(cls, model_name, device=None, num_slots=16, batch_size=16,
             chunk_ms=None, precision=None, fast_encoder=True, vad=True,
             cuda_graph_decoder=False):
        """precision: ``float32``, ``bfloat16``, ``float16``, or ``int8``
        (CPU only: eight-bit encoder weights, :mod:`parakeet.engine.quantize`);
        None: bfloat16 on CUDA, float32 on the CPU.  vad: run voice activity
        detection on every stream.  cuda_graph_decoder: run NeMo's greedy
        decoder as CUDA graphs (on CUDA; ignored on the CPU)."""
        quiet_nemo()
        from .nemo.pipeline import ServingPipeline, pipeline_config

        kind, index = parse_device(device)
        if kind == "cpu":
            keep_cpu_kernels()
        if precision is None:
            precision = "bfloat16" if kind == "cuda" else "float32"
        if precision not in PRECISIONS:
            raise ValueError("unknown precision %r (use %s)" % (precision, ", ".join(PRECISIONS)))
        if precision == "int8" and kind != "cpu":
            raise ValueError("precision int8 is for the CPU; use bfloat16 on CUDA")
        if precision == "float16" and kind != "cuda":
            raise ValueError("precision float16 is for CUDA; use bfloat16 or float32 on the CPU")
        cfg = pipeline_config(
            model_name, device=kind, device_id=index,
            compute_dtype="float32" if precision == "int8" else precision,
            num_slots=num_slots, batch_size=min(batch_size, num_slots),
            cuda_graph_decoder=cuda_graph_decoder and kind == "cuda")
        pipeline = ServingPipeline.build(cfg, chunk_ms=chunk_ms, fast_encoder=fast_encoder)
        if precision == "int8":
            from .quantize import quantize_encoder

            quantize_encoder(pipeline.asr_model.asr_model.encoder)
        detector = None
        if vad:
            from .vad import SAMPLE_RATE, VoiceActivity

            if pipeline.sample_rate != SAMPLE_RATE:
                raise ValueError("voice activity detection needs a %d Hz model"
                                 % (SAMPLE_RATE,))
            detector = VoiceActivity(pipeline.device)
        return cls(pipeline, model_name, precision, detector)

    @property
    def sample_rate(self):
        return self.geometry.sample_rate

    @property
    def vocabulary_size(self):
        return len(self.pipeline.vocabulary)

    def decode_offline(self, samples, language=None):
        """What the model decodes from a whole utterance at once, the
        reference streaming must match: (token ids, encoder frame of each
        token, number of feature frames).  language: a multilingual model's
        (None: the default)."""
        asr = self.pipeline.asr_model
        model = asr.asr_model
        signal = torch.from_numpy(np.asarray(samples, dtype=np.float32))[None].to(self.device)
        with torch.inference_mode():
            feats, feat_len = self.pipeline.preprocessor(
                input_signal=signal, length=torch.tensor([signal.shape[1]], device=self.device))
            encoded, encoded_len = model.encoder(
                audio_signal=feats.to(asr.cast_dtype), length=feat_len)
            if self.languages:
                encoded = asr.prompted(encoded, self.pipeline.prompt_vector(
                    language or self.default_language))
            hyp = model.decoding.rnnt_decoder_predictions_tensor(
                encoded, encoded_len, return_hypotheses=True)[0]
        return (hyp.y_sequence.tolist(), [int(t) for t in torch.as_tensor(hyp.timestamp).tolist()],
                int(feat_len[0]))

    def features(self, chunks):
        """Log-mel frames of each chunk, computed in batches of equal shape."""
        g = self.geometry
        skip = g.margin // g.hop
        out = [None] * len(chunks)
        by_size = {}
        for i, chunk in enumerate(chunks):
            by_size.setdefault(chunk.n_frames, []).append(i)
        for n_frames, rows in by_size.items():
            signal = torch.from_numpy(
                np.stack([chunks[i].samples for i in rows])).to(self.device)
            length = torch.tensor([chunks[i].valid_samples for i in rows],
                                  device=self.device)
            feats, _ = self.pipeline.preprocessor(input_signal=signal, length=length)
            feats = feats[:, :, skip:skip + n_frames]
            for j, i in enumerate(rows):
                out[i] = feats[j]
        return out

    def _buffer(self, chunk, feats):
        g = self.geometry
        if chunk.is_first:
            previous = feats.new_zeros(self._n_features, self._first_cache_frames)
        else:
            previous = self._feature_cache.pop(chunk.stream_id)
        cache_len = previous.shape[1]
        buffer = torch.cat([previous, feats], dim=1)
        if not chunk.is_last:
            tail = buffer[:, -g.cache_frames:]
            if tail.shape[1] < g.cache_frames:
                tail = torch.cat([tail.new_zeros(self._n_features, g.cache_frames - tail.shape[1]), tail], 1)
            self._feature_cache[chunk.stream_id] = tail
        if chunk.is_first and not self.pipeline.first_chunks_apart:
            # As long as every later chunk's buffer, to share their batch.
            width = g.cache_frames + g.chunk_frames
            buffer = torch.cat([buffer, buffer.new_zeros(self._n_features, width - buffer.shape[1])], 1)
        options = None
        if chunk.is_first:
            options = self._first_options(chunk)
        else:
            if chunk.keyterms is not None:
                self.pipeline.replace_biasing(chunk.stream_id,
                                              self._keyterm_biasing(chunk.keyterms))
            if chunk.language is not None and self.languages:
                self.pipeline.set_language(chunk.stream_id, chunk.language)
        return self._feature_buffer(
            features=buffer, stream_id=chunk.stream_id, is_first=chunk.is_first,
            is_last=chunk.is_last, length=cache_len + chunk.valid_frames, options=options)

    def _first_options(self, chunk):
        """A stream's request options: its key terms' boosting tree and its
        language, if it has them."""
        if not chunk.keyterms and not self.languages:
            return self._options
        return self._request_options(
            stop_history_eou=self._options.stop_history_eou,
            biasing_cfg=self._keyterm_biasing(chunk.keyterms),
            language_code=(chunk.language or self.default_language) if self.languages else None)

    def _keyterm_biasing(self, keyterms):
        """NeMo's biasing request for keyterms (None for none)."""
        from .nemo.pipeline import keyterm_config

        return keyterm_config(keyterms, self.keyterm_weight) if keyterms else None

    def abort(self, stream_ids):
        """Forget streams that will get no last chunk: their NeMo state, encoder
        cache slot and feature cache.  (NeMo's pipeline frees a stream only when
        it processes the stream's last request.)"""
        pipeline = self.pipeline
        manager = pipeline.context_manager
        held = [sid for sid in stream_ids if sid in manager.streamidx2slotidx]
        if held:
            manager.reset_slots(held, [True] * len(held))
        for sid in stream_ids:
            state = pipeline.get_state(sid)
            if state is not None and state.has_biasing_request():
                # NeMo removes a stream's boosting tree only at its last chunk.
                state.options.biasing_cfg.remove_from_multi_model(pipeline.biasing_store)
            pipeline.delete_state(sid)
            self._feature_cache.pop(sid, None)
        if self.vad is not None:
            self.vad.forget(stream_ids)

    def _voice_activity(self, chunks):
        """Speech probabilities of the audio each chunk moves the stream on by."""
        if self.vad is None:
            return {}
        g = self.geometry
        audio = {}
        for chunk in chunks:
            count = max(0, min(chunk.n_frames * g.hop, chunk.valid_samples - g.margin))
            audio[chunk.stream_id] = chunk.samples[g.margin:g.margin + count]
        speech = self.vad(audio)
        self.vad.forget([c.stream_id for c in chunks if c.is_last])
        return speech

    def warm_up(self, seconds=1.0, stream_id=0):
        """Decode seconds of silence as one stream (an id no client gets), so
        that the first clients' steps do not pay for what is set up lazily."""
        from ..contract import ChunkCutter

        cutter = ChunkCutter(stream_id, self.geometry)
        cutter.push(np.zeros(int(seconds * self.sample_rate), dtype=np.float32))
        cutter.finish()
        for chunk in iter(cutter.next_chunk, None):
            self.step([chunk])

    def text_of(self, token_ids):
        """The text token_ids add to a transcript (control tokens left out)."""
        return "".join(map(piece_text, self._pieces(token_ids) if token_ids else []))

    def step(self, chunks):
        """Decode one chunk of each stream; returns one StepResult per chunk."""
        results = {}
        work = []
        for chunk in chunks:
            if chunk.is_first and chunk.is_last and chunk.valid_frames == 0:
                # Shorter than one frame: offline decoding yields nothing either.
                results[chunk.stream_id] = StepResult(chunk.stream_id, [], [], "", True)
            else:
                work.append(chunk)
        if work:
            try:
                with torch.inference_mode():
                    speech = self._voice_activity(work)
                    feats = self.features(work)
                    buffers = [self._buffer(c, f) for c, f in zip(work, feats)]
                    self.pipeline.transcribe_step(buffers)
            except BaseException:
                # The batch's streams end with the error: free what they hold.
                self.abort([c.stream_id for c in work])
                raise
            emitted = self.pipeline.emitted
            for chunk in work:
                e = emitted.get(chunk.stream_id)
                tokens = e.token_ids if e else []
                pieces = self._pieces(tokens) if tokens else []
                results[chunk.stream_id] = StepResult(
                    chunk.stream_id, tokens, e.confidences if e else [],
                    "".join(map(piece_text, pieces)), chunk.is_last,
                    e.frames if e else [], speech.get(chunk.stream_id, []),
                    bool(e and e.endpoint), pieces)
        return [results[c.stream_id] for c in chunks]

