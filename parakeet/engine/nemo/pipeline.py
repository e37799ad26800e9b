"""
nemo_toolkit 3.0's cache-aware RNNT serving pipeline, adapted for a server.

What the server takes from ``nemo.collections.asr.inference`` as it is: the
inference wrapper (model loading, decoding strategy, dtype, the batched
``stream_step`` over encoder caches and partial RNNT hypotheses), the
pipeline's per-stream states, the cache-slot bookkeeping of its context manager, its
``transcribe_step`` over ``FeatureBuffer`` requests and its greedy decoder.

What :class:`ServingPipeline` changes, each because the stock pipeline falls
short for a server:

* Features come from :mod:`parakeet.contract` as exact per-chunk feature
  buffers (``FeatureBuffer`` requests) instead of the pipeline's own
  bufferer, whose chunk-local mel frames and padded first chunk make
  streaming differ from offline decoding of the same audio.
* The first chunk of a stream is run the way NeMo's own cache-aware
  streaming runs it: without pre-encode cache and without dropping
  pre-encoded frames.  The stock pipeline pads it to a regular chunk, which
  moves every later chunk boundary.
* Each step records, per stream, the tokens, confidences and frame indices
  it emitted, for the server's results.  The stock pipeline keeps them only
  until the next end of utterance and reports text.
* Each step also records whether NeMo's blank-based endpointing
  (``stop_history_eou``) found the end of an utterance; the server combines
  it with the model's ``<EOU>`` token and voice activity
  (:mod:`parakeet.server.turns`).  The stock pipeline's label history is exactly
  ``stop_history_eou`` frames long while its endpointer asks for *more*
  blank frames than that, so it never fires; the history here holds one
  frame more.
* The partial transcript the stock pipeline re-detokenises from every token
  since the last end of utterance on every step (work that grows with the
  stream) is not computed: the server builds text incrementally from the
  emitted tokens.
* Encoder caches are gathered and written back with fewer copies
  (:mod:`parakeet.engine.nemo.slots`).
* Streams' last chunks are decoded in the same encoder call as the other
  chunks of the step.  The stock pipeline gives them a call of their own
  (they keep all of their outputs), which made every step that ended a
  stream pay the encoder's fixed cost twice; here each row is cut to what
  it keeps by its length instead.
"""

import copy
import dataclasses

import attr
import torch
from omegaconf import OmegaConf

from nemo.collections.asr.inference.factory.cache_aware_pipeline_builder import (
    CacheAwarePipelineBuilder,
)
from nemo.collections.asr.inference.model_wrappers.cache_aware_rnnt_inference_wrapper import (
    CacheAwareRNNTInferenceWrapper,
)
from nemo.collections.asr.inference.pipelines.cache_aware_rnnt_pipeline import (
    CacheAwareRNNTPipeline,
)
# The requests a step takes, for the engine.
from nemo.collections.asr.inference.streaming.framing.request import FeatureBuffer  # noqa: F401
from nemo.collections.asr.inference.streaming.framing.request_options import (  # noqa: F401
    ASRRequestOptions,
)
from nemo.collections.asr.inference.utils.context_manager import CacheAwareContext

from .fastencoder import RowDrops, accelerate
from .loading import load_asr_model
from .slots import SlotCaches


def pipeline_config(model_name, device="cpu", device_id=0, compute_dtype="float32",
                    num_slots=16, batch_size=16, max_symbols=10, cuda_graph_decoder=False):
    """The DictConfig the NeMo pipeline classes read, for one served model."""
    return OmegaConf.create({
        "pipeline_type": "cache_aware",
        "asr_decoding_type": "rnnt",
        "asr": {
            "model_name": model_name,
            "device": device,
            "device_id": device_id,
            "compute_dtype": compute_dtype,
            "use_amp": False,
            "decoding": {
                "strategy": "greedy_batch",
                "preserve_alignments": False,
                "fused_batch_size": -1,
                "greedy": {
                    "max_symbols": max_symbols,
                    "preserve_frame_confidence": True,
                    # Off unless asked for, as in NeMo's own serving configuration.
                    "use_cuda_graph_decoder": cuda_graph_decoder,
                    # Each stream's key terms, in a boosting tree of its own.
                    "enable_per_stream_biasing": True,
                },
            },
        },
        "confidence": {
            "exclude_blank": True,
            "aggregation": "mean",
            "method_cfg": {"name": "entropy", "entropy_type": "tsallis",
                           "alpha": 0.33, "entropy_norm": "exp"},
        },
        "streaming": {
            "sample_rate": 16000,
            "batch_size": batch_size,
            "num_slots": num_slots,
            "att_context_size": None,  # the model's own, unless build() picks one
            "use_cache": True,
            "use_feat_cache": True,
            "word_boundary_tolerance": 4,
            "request_type": "feature_buffer",
            "chunk_size_in_secs": None,
        },
        "itn": {"batch_size": 32, "n_jobs": 1, "left_padding_size": 4},
        "enable_itn": False,
        "enable_nmt": False,
        "nmt": None,
        "asr_output_granularity": "segment",
        # Set per stream (Engine.endpointing_ms).
        "endpointing": {"stop_history_eou": -1, "residue_tokens_at_end": 0},
        "return_tail_result": False,
        "cache_dir": None,
    })


def chunk_choices(asr):
    """{chunk ms: attention context [left, look-ahead]} for each look-ahead
    the model was trained with."""
    encoder = asr.asr_model.encoder
    frame_ms = asr.get_model_stride(in_milliseconds=True)
    left = encoder.att_context_size[0]
    supported = [list(c) for c in getattr(encoder, "att_context_size_all", None)
                 or [encoder.att_context_size]]
    return {round((c[1] + 1) * frame_ms): c for c in supported if c[0] == left}


def att_context_for(asr, chunk_ms):
    """The attention context [left, look-ahead] whose chunks are chunk_ms long."""
    choices = chunk_choices(asr)
    if chunk_ms not in choices:
        raise ValueError("the model cannot run %d ms chunks; it was trained for %s ms"
                         % (chunk_ms, ", ".join(str(ms) for ms in sorted(choices))))
    return choices[chunk_ms]


class ServingModel(CacheAwareRNNTInferenceWrapper):
    """The NeMo wrapper, loading through :func:`parakeet.engine.nemo.loading.load_asr_model`.

    It also runs the model in bfloat16 on the CPU when asked (NeMo's wrapper
    runs every CPU model in float32): on CPUs with AMX or AVX-512 BF16 a
    bfloat16 product costs a quarter of a float32 one.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.device_str == "cpu" and kwargs.get("compute_dtype") == "bfloat16":
            self.compute_dtype = self.cast_dtype = torch.bfloat16
            self.asr_model.to(torch.bfloat16)
        #: A multilingual model's prompt projection, in float32 whatever the
        #: model's arithmetic: in bfloat16 a one-hot language's share of
        #: the projection's sums is lost to rounding.
        self.prompt_kernel = None
        if getattr(self.asr_model, "concat", False):
            self.prompt_kernel = copy.deepcopy(self.asr_model.prompt_kernel).float()

    def load_model(self, model_name, map_location):
        return load_asr_model(model_name, map_location)

    def prompted(self, encoded, prompt_vectors):
        """The encoder's output (B, D, T) under each row's language prompt
        (one-hot rows of prompt_vectors), as the model's joint reads it."""
        rows = encoded.transpose(1, 2).float()
        prompts = prompt_vectors.float()[:, None, :].expand(-1, rows.shape[1], -1)
        return self.prompt_kernel(torch.cat([rows, prompts], dim=-1)).transpose(1, 2).to(
            encoded.dtype)

    def execute_step(self, processed_signal, processed_signal_length, context,
                     previous_hypotheses, drop_extra_pre_encoded, keep_all_outputs,
                     drop_left_context=None, valid_out_len=None, prompt_vectors=None):
        """NeMo's step, with two changes: keep_all_outputs may also be a
        list, per row (ServingPipeline), and a multilingual model's rows
        get their language prompts (NeMo 3.0's wrapper takes them and
        drops them)."""
        per_row = isinstance(keep_all_outputs, list)
        encoder = self.asr_model.encoder
        encoded, encoded_len, channel, time, channel_len = encoder.cache_aware_stream_step(
            processed_signal=processed_signal, processed_signal_length=processed_signal_length,
            cache_last_channel=context.cache_last_channel,
            cache_last_time=context.cache_last_time,
            cache_last_channel_len=context.cache_last_channel_len,
            keep_all_outputs=per_row or keep_all_outputs,
            drop_extra_pre_encoded=drop_extra_pre_encoded)
        if per_row:
            # Last chunks beside others, in one encoder call: every row's
            # output is kept, then the other rows are cut to what they
            # would keep on their own, by their lengths (the decoder reads
            # no further).
            kept = encoder.streaming_cfg.valid_out_len
            if kept > 0:
                last = torch.tensor(keep_all_outputs, device=encoded_len.device)
                encoded_len = torch.where(last, encoded_len, encoded_len.clamp(max=kept))
        else:
            if drop_left_context:
                encoded = encoded[:, :, drop_left_context:]
                encoded_len = encoded_len - drop_left_context
            if valid_out_len and not keep_all_outputs:
                encoded = encoded[:, :, :valid_out_len]
                encoded_len = torch.ones_like(encoded_len) * valid_out_len
        if prompt_vectors is not None and self.prompt_kernel is not None:
            encoded = self.prompted(encoded, prompt_vectors)
        best_hyp = self.asr_model.decoding.rnnt_decoder_predictions_tensor(
            encoded, encoded_len, return_hypotheses=True, partial_hypotheses=previous_hypotheses)
        return best_hyp, CacheAwareContext(cache_last_channel=channel, cache_last_time=time,
                                           cache_last_channel_len=channel_len)


@attr.s(slots=True)
class Emitted:
    """What one step decoded for one stream."""

    token_ids = attr.ib(factory=list)
    confidences = attr.ib(factory=list)
    frames = attr.ib(factory=list)
    #: NeMo's endpointing found an end of utterance in this step.
    endpoint = attr.ib(default=False)


def _as_list(values):
    if values is None:
        return None
    if hasattr(values, "tolist"):
        return values.tolist()
    # A list, whose items are tensors where NeMo merged hypotheses (as it
    # does for streams with key terms).
    return [v.item() if hasattr(v, "item") else v for v in values]


class ServingPipeline(CacheAwareRNNTPipeline):

    def __init__(self, cfg, asr_model):
        super().__init__(cfg, asr_model)
        self._drop_extra_pre_encoded = self.asr_model.drop_extra_pre_encoded
        self.emitted = {}
        #: Whether streams' first chunks take an encoder call of their own.
        #: The accelerated encoder drops pre-encoded frames row by row, so
        #: with it (the cache on, subsampling causal) they go with the
        #: others, their feature buffers padded on the right to the others'
        #: length.
        self.first_chunks_apart = True

    @classmethod
    def build(cls, cfg, chunk_ms=None, fast_encoder=True):
        """Load the model named in cfg and build the pipeline around it.

        chunk_ms picks one of the look-aheads a multi-look-ahead model was
        trained with; ValueError if the model has no such chunk size.
        """
        decoding_cfg = CacheAwarePipelineBuilder.get_rnnt_decoding_cfg(cfg)
        asr = ServingModel(
            model_name=cfg.asr.model_name, decoding_cfg=decoding_cfg,
            device=cfg.asr.device, device_id=cfg.asr.device_id,
            compute_dtype=cfg.asr.compute_dtype, use_amp=cfg.asr.use_amp)
        if chunk_ms is not None:
            cfg.streaming.att_context_size = att_context_for(asr, chunk_ms)
        accelerated = False
        if fast_encoder:
            # NeMo's pipeline replaces a step's input caches by its output.
            accelerated = bool(accelerate(asr.asr_model, caches_in_place=True))
        pipeline = cls(cfg, asr)
        # Padding on the right reaches none of a first chunk's outputs only
        # through causal subsampling (NeMo's streaming models have it).
        causal = getattr(asr.asr_model.encoder.pre_encode, "is_causal", False)
        pipeline.first_chunks_apart = not (accelerated and pipeline.use_cache and causal)
        return pipeline

    def init_context_manager(self):
        self.context_manager = SlotCaches(
            cache_aware_model=self.asr_model, num_slots=self.num_slots, use_cache=self.use_cache)

    def create_state(self, options):
        state = super().create_state(options)
        if state.label_buffer_size > 0:
            state.setup_label_buffer(state.label_buffer_size + 1, self.blank_id)
        return state

    def transcribe_step_for_feature_buffers(self, fbuffers):
        self.emitted = {}
        # Last chunks go with the others (ServingModel.execute_step), and so
        # do first chunks unless first_chunks_apart.
        groups = {}
        for fbuffer in fbuffers:
            groups.setdefault(self.first_chunks_apart and fbuffer.is_first, []).append(fbuffer)
        ready_state_ids = set()
        for group in groups.values():
            paddings = [f.size - f.valid_size for f in group]
            self.cache_aware_transcribe_step(
                group, [f.features for f in group], paddings if any(paddings) else None,
                ready_state_ids, keep_all_outputs=any(f.is_last for f in group))
        if ready_state_ids:
            self.text_processor.process([self.get_state(s) for s in ready_state_ids])

    def cache_aware_transcribe_step(self, requests, features, right_paddings,
                                    ready_state_ids, keep_all_outputs=False):
        # In slot order, so that the batch's caches are read and written as
        # views where its slots are consecutive.
        order = self.context_manager.order([r.stream_id for r in requests])
        requests = [requests[i] for i in order]
        # A first chunk carries no pre-encode cache, so no pre-encoded frames
        # are dropped from it.  Padded to the others' length, it is cut row
        # by row.
        regular = self._drop_extra_pre_encoded
        if not any(r.is_first for r in requests):
            drop = regular
        elif self.first_chunks_apart:
            drop = 0
        else:
            drop = RowDrops([0 if r.is_first else regular for r in requests], regular)
        self.asr_model.drop_extra_pre_encoded = drop
        features = [features[i] for i in order]
        if right_paddings is not None:
            right_paddings = [right_paddings[i] for i in order]
        lasts = [r.is_last for r in requests]
        if keep_all_outputs and not all(lasts) and self.use_cache:
            # Only the last chunks keep all their outputs (with the cache,
            # NeMo's step drops no left context and cuts no outputs itself).
            keep_all_outputs = lasts
        super().cache_aware_transcribe_step(
            requests, features, right_paddings, ready_state_ids, keep_all_outputs)

    @property
    def languages(self):
        """The language codes a multilingual model takes (its prompt
        dictionary's keys); empty for other models."""
        if not self.prompt_enabled:
            return ()
        return tuple(sorted(self._prompt_config["prompt_dict"]))

    def set_language(self, stream_id, code):
        """Decode a stream's next steps under language code's prompt."""
        self.get_state(stream_id).set_prompt_index(self._resolve_prompt_index(code))

    def prompt_vector(self, code):
        """Language code's one-hot prompt, a row of a step's prompt vectors."""
        return self._create_one_hot_prompts(
            torch.tensor([self._resolve_prompt_index(code)], device=self.device))

    @property
    def biasing_store(self):
        """The decoder's store of every stream's key-term boosting tree."""
        return self.asr_model.asr_model.decoding.decoding.decoding_computer.biasing_multi_model

    def replace_biasing(self, stream_id, biasing_cfg):
        """Give a stream other key terms (biasing_cfg None: none) from its
        next step on.  NeMo takes a stream's biasing request once, with its
        first chunk; here the old boosting tree leaves the store, the new
        one is added by the step as a first chunk's is, and the stream's
        place in the old tree goes back to the start, where a new stream's
        is."""
        state = self.get_state(stream_id)
        if state.has_biasing_request():
            state.options.biasing_cfg.remove_from_multi_model(self.biasing_store)
        state.options = dataclasses.replace(state.options, biasing_cfg=biasing_cfg)
        hyp = state.get_previous_hypothesis()
        if hyp is not None:
            hyp.biasing_cfg = biasing_cfg
            if hyp.dec_state is not None:
                # The store is the decoder's last fusion model.
                hyp.dec_state.fusion_state_list[-1] = self.biasing_store.get_init_states(1)[0]

    def run_greedy_decoder(self, state, request, hyp):
        start = state.offset
        tokens = _as_list(hyp.y_sequence)[start:]
        confidences = _as_list(hyp.non_blank_step_confidence_precomputed)
        confidences = confidences[start:] if confidences is not None else [0.0] * len(tokens)
        emitted = self.emitted[request.stream_id] = Emitted(
            tokens, [float(c) for c in confidences], _as_list(hyp.timestamp)[start:])
        endpoint = super().run_greedy_decoder(state, request, hyp)
        emitted.endpoint = endpoint and not request.is_last
        return endpoint

    def update_partial_transcript(self, requests, tokenizer, leading_regex_pattern):
        """Not needed: the server detokenises each step's new tokens once."""


def keyterm_config(keyterms, weight):
    """NeMo's per-stream biasing request for phrases keyterms: a boosting
    tree of their tokens, added to the decoder's shared store on the
    stream's first chunk and removed at its last."""
    from nemo.collections.asr.parts.context_biasing.biasing_multi_model import (
        BiasingRequestItemConfig)
    from nemo.collections.asr.parts.context_biasing.boosting_graph_batched import (
        BoostingTreeModelConfig)

    return BiasingRequestItemConfig(
        boosting_model_cfg=BoostingTreeModelConfig(key_phrases_list=list(keyterms)),
        boosting_model_alpha=weight)
