"""
Everything the server changes in nemo_toolkit, or relies on beyond its
documented API, in one package: :mod:`.loading` (loading checkpoints),
:mod:`.pipeline` (the serving pipeline and inference wrapper, subclassed),
:mod:`.slots` (the encoder cache slots, subclassed) and :mod:`.fastencoder`
(the encoder's streaming step, replaced per model after checking its
assumptions).  Nothing outside this package imports ``nemo`` except
:mod:`parakeet.measuring.replica` and the demo model's training script,
which build models from configs.

It was written against, and is tested with, the nemo_toolkit versions in
:data:`TESTED`; importing it with any other fails with
:class:`UntestedNeMo`, saying so, unless ``PARAKEET_UNTESTED_NEMO=1`` is set
(then it warns and goes on; the tests in ``tests/test_fastencoder.py``,
``tests/test_slots.py`` and ``tests/test_engine.py`` say whether it works).

The NeMo names it relies on that are not part of NeMo's documented API,
each of which a NeMo release may change:

``nemo.collections.asr.inference`` (the serving pipeline)
    * ``CacheAwareRNNTPipeline``: its constructor and ``asr_model``,
      ``context_manager``, ``tokenizer``, ``preprocessor``, ``sample_rate``,
      ``device``, ``delete_state`` and ``transcribe_step``; the methods
      overridden here: ``init_context_manager``, ``create_state``,
      ``transcribe_step_for_feature_buffers``,
      ``cache_aware_transcribe_step``, ``run_greedy_decoder``,
      ``update_partial_transcript``; and the ``_drop_extra_pre_encoded``
      attribute it sets.
    * ``CacheAwarePipelineBuilder`` (building the pipeline's parts from a
      config) and the config keys of ``pipeline_config``.
    * ``CacheAwareRNNTInferenceWrapper``: ``load_model`` and
      ``execute_step`` (overridden), ``asr_model``, ``device_str``,
      ``compute_dtype``, ``cast_dtype``, ``drop_extra_pre_encoded``,
      ``get_input_features``, ``get_model_stride``.
    * ``CacheAwareContextManager``: its slot table (``cache_last_channel``,
      ``cache_last_time``, ``cache_last_channel_len``, ``free_slots``,
      ``num_slots``, ``cache_disabled``, ``device``, ``streamidx2slotidx``,
      ``slotidx2streamidx``) and ``reset``, ``get_context``,
      ``update_cache`` (overridden); ``CacheAwareContext``.
    * ``FeatureBuffer`` and ``ASRRequestOptions`` (the requests a step
      takes), and the state's ``offset``.

``nemo.collections.asr`` (the model)
    * ``ConformerEncoder``: ``streaming_cfg``, ``cache_aware_stream_step``,
      ``pre_encode``, ``pos_enc``, ``layers``, ``d_model``,
      ``att_context_style``, ``self_attention_model``,
      ``reduction_position`` and the private ``_create_masks``.
    * ``ConformerLayer``, ``ConformerConvolution``,
      ``RelPositionMultiHeadAttention``, ``RelPositionalEncoding``,
      ``CausalConv1D`` (and its private ``_right_padding``), ``INF_VAL``,
      ``avoid_float16_autocast_context``: the modules whose forward
      :mod:`.fastencoder` re-implements for the streaming step.
    * The decoding's ``rnnt_decoder_predictions_tensor`` with
      ``partial_hypotheses``, and the hypotheses' ``y_sequence``,
      ``timestamp`` and ``non_blank_step_confidence_precomputed``.
    * The preprocessor's ``featurizer`` (``hop_length``, ``n_fft``,
      ``stft_pad_amount``, ``frame_splicing``).

``nemo.core`` and ``nemo.utils``
    * ``ASRModel.restore_from`` and ``from_pretrained`` (with
      ``return_model_file``), ``SaveRestoreConnector.model_extracted_dir``.
    * ``nemo.utils.logging``.

Other libraries' private names the engine relies on: torch's
``Tensor._version`` (:mod:`.fastencoder` keeps position projections while
their weights are unmodified) and the Silero VAD package's
``torch.jit`` module's ``_model`` (:mod:`parakeet.engine.vad`).
"""

import os
import warnings
from importlib import metadata

from ...checkpoints import CannotServe

#: The nemo_toolkit versions this package was tested with.
TESTED = ("3.0.0",)

#: Set to 1 to run with a nemo_toolkit outside :data:`TESTED`.
OVERRIDE = "PARAKEET_UNTESTED_NEMO"


class UntestedNeMo(CannotServe, ImportError):
    """The installed nemo_toolkit is not one this package was tested with."""


def check_version(installed=None, environ=os.environ):
    """Raise :class:`UntestedNeMo` unless installed (default: the installed
    nemo_toolkit's version) is in :data:`TESTED` or the override is set."""
    if installed is None:
        try:
            installed = metadata.version("nemo_toolkit")
        except metadata.PackageNotFoundError:
            raise UntestedNeMo("nemo_toolkit is not installed: install it with "
                               "pip install 'nemo_toolkit[asr]==%s'" % (TESTED[-1],))
    if installed in TESTED:
        return
    message = ("nemo_toolkit %s is installed, but parakeet-server's adaptation of NeMo "
               "(parakeet/engine/nemo) is tested with %s only: install "
               "'nemo_toolkit[asr]==%s', or set %s=1 to try this version anyway"
               % (installed, ", ".join(TESTED), TESTED[-1], OVERRIDE))
    if environ.get(OVERRIDE) == "1":
        warnings.warn(message)
        return
    raise UntestedNeMo(message)


check_version()
