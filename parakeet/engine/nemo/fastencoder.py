"""
A cheaper streaming step for cache-aware FastConformer encoders.

NeMo's cache-aware encoder keeps, per layer, the *inputs* of the attention
for the last ``C`` frames (``cache_last_channel``, ``[L, B, C, D]``).  At
every streaming step, in every layer, it concatenates them with the ``T`` new
frames and recomputes ``linear_k`` and ``linear_v`` over all ``C + T`` frames,
and ``linear_pos`` over the ``2 (C + T) - 1`` relative position embeddings,
although the keys and values of old frames never change and the position
embeddings depend only on the chunk geometry.  With ``C = 70`` and ``T = 2``
that is nearly all of the attention's work.

:func:`accelerate` changes the streaming path of a loaded model, and only
that path: the encoder's forward without caches (offline decoding, training)
stays NeMo's own, untouched.

* The channel cache holds projected keys and values instead of inputs.
  ``cache_last_channel`` keeps its place and its ``[L, B, C, 2 D]`` shape, so
  NeMo's context manager still assigns, gathers, scatters and resets slots
  along dimension 1.  Each layer's ``C x 2 D`` block of a slot holds the keys
  then the values of the last ``C`` frames, each laid out head-major
  (``[heads, C, d_k]``), the layout the attention multiplies in: a step
  projects only its new frames and appends them per head, with no
  rearranging of the old ones.  The oldest frames fall off exactly as NeMo's
  inputs do, and cache positions not yet filled are masked from
  ``cache_last_channel_len`` as before, so what they hold never matters.
* ``linear_pos`` of the position embeddings is computed once per layer and
  geometry, and kept while the positional buffer and the ``linear_pos``
  weights are the same tensors, over the same memory, unmodified.
* The attention mask is built only for the new frames' rows, from a
  memoised geometry-only part (the chunked context).
* The position scores of all streams are one batched product per layer, not
  a product against the position projections copied once per stream.
* With ``caches_in_place`` (the server's pipeline asks for it), a step writes
  its next caches over the ones it was given instead of into new tensors:
  each layer reads all of its cache block before it writes the block again.
  The caches of a batch of consecutive slots are views of the slot table,
  so nothing is copied back after the step.
* The convolution module runs channels-last, its pointwise convolutions as
  matrix products and its depthwise one as one small product per channel:
  on a couple of frames, ``conv1d`` calls cost far more than the arithmetic.

Encoder outputs equal NeMo's up to float rounding (a product over 2 rows
may round differently from the same rows in a product over 72).

Models outside these assumptions are left as they are, and
:func:`accelerate` says why.  Adapters added after acceleration make a
streaming step fail rather than be ignored; tensor access capture (inter-CTC,
``save_encoder_tensors``) is not recorded on the streaming path.
"""

import collections
import math
import random

import attr
import torch
import torch.nn.functional as F
from nemo.collections.asr.modules.conformer_encoder import ConformerEncoder
from nemo.collections.asr.parts.submodules.causal_convs import CausalConv1D
from nemo.collections.asr.parts.submodules.conformer_modules import (
    ConformerConvolution, ConformerLayer)
from nemo.collections.asr.parts.submodules.multi_head_attention import (
    INF_VAL, RelPositionalEncoding, RelPositionMultiHeadAttention)
from nemo.utils import avoid_float16_autocast_context
from torch import nn
from torch.nn.attention import sdpa_kernel
from twisted.logger import Logger

log = Logger()

_MEMO_SIZE = 8  # geometries remembered; a server sees two or three


@attr.s(frozen=True)
class RowDrops:
    """A ``drop_extra_pre_encoded`` for a batch of chunks with and without
    a pre-encode cache, their feature buffers padded to one length: row i
    drops its first ``rows[i]`` pre-encoded frames, and every row keeps as
    many as a row dropping ``regular`` does (the rest is padding).  Only the
    accelerated encoder takes it."""

    rows = attr.ib(converter=tuple)
    regular = attr.ib()

    def apply(self, x, length):
        """x [B, T, D] and its lengths, each row cut to its own frames."""
        n = x.size(1) - self.regular
        drops = torch.tensor(self.rows, device=x.device)
        frames = (drops.unsqueeze(1) + torch.arange(n, device=x.device)).unsqueeze(2)
        x = x.gather(1, frames.expand(-1, -1, x.size(2)))
        return x, (length - drops).clamp(min=0, max=n)


@attr.s
class Acceleration:
    """What :func:`accelerate` did: truthy when the streaming path is accelerated."""

    applied = attr.ib()
    reason = attr.ib(default="")

    def __bool__(self):
        return self.applied


def accelerate(model, caches_in_place=False):
    """Give the cache-aware streaming path of model's encoder a key/value cache.

    model is a NeMo ASR model (anything with an ``encoder``) or an encoder.
    Call it before creating caches (NeMo's context manager creates them when
    a pipeline is built).  Calling it again is harmless.  caches_in_place:
    each streaming step overwrites the caches it is given with the next ones
    (and returns them), for callers that do not read a step's input caches
    afterwards.
    """
    encoder = getattr(model, "encoder", model)
    step = vars(encoder).get("_streaming_step")
    if isinstance(step, _StreamingStep):
        step.caches_in_place = caches_in_place
        return Acceleration(True, "already accelerated")
    reason = unsupported_reason(encoder)
    if reason:
        log.info("streaming encoder left as it is: {reason}", reason=reason)
        return Acceleration(False, reason)
    step = _StreamingStep(encoder, caches_in_place)
    encoder._streaming_step = step
    encoder.forward_internal = step.forward_internal
    encoder.get_initial_cache_state = step.initial_cache_state
    return Acceleration(True)


def unsupported_reason(encoder):
    """Why encoder's streaming step cannot be accelerated, or None."""
    if not isinstance(encoder, ConformerEncoder):
        return "not a ConformerEncoder: %s" % type(encoder).__name__
    if encoder.self_attention_model != "rel_pos":
        return "self-attention %r, not rel_pos" % (encoder.self_attention_model,)
    if encoder.att_context_style != "chunked_limited":
        return "attention context style %r, not chunked_limited" % (encoder.att_context_style,)
    if encoder.reduction_position is not None:
        return "time reduction inside the encoder"
    if type(encoder.pos_enc) is not RelPositionalEncoding:
        return "positional encoding %s" % type(encoder.pos_enc).__name__
    for i, layer in enumerate(encoder.layers):
        reason = _layer_unsupported(layer)
        if reason:
            return "layer %d: %s" % (i, reason)
    return None


def _layer_unsupported(layer):
    if type(layer) is not ConformerLayer:
        return "a %s" % type(layer).__name__
    if layer.is_adapter_available():
        return "has adapters"
    attn = layer.self_attn
    if type(attn) is not RelPositionMultiHeadAttention:
        return "attention is a %s" % type(attn).__name__
    if not all(isinstance(getattr(attn, name), nn.Linear)
               for name in ("linear_q", "linear_k", "linear_v", "linear_out", "linear_pos")):
        return "attention projections are not nn.Linear"
    conv = layer.conv
    if type(conv) is not ConformerConvolution or conv.pointwise_activation != "glu_":
        return "convolution module is not the GLU ConformerConvolution"
    if not (is_pointwise(conv.pointwise_conv1) and is_pointwise(conv.pointwise_conv2)):
        return "pointwise convolutions are not plain width-one ones"
    dw = conv.depthwise_conv
    if not (isinstance(dw, CausalConv1D) and dw.groups == dw.in_channels == dw.out_channels
            and _is_plain_conv(dw)):
        return "depthwise convolution is not a plain causal depthwise one"
    return None


def _is_plain_conv(conv):
    return (conv.stride == (1,) and conv.dilation == (1,) and conv.padding == (0,)
            and conv.padding_mode == "zeros")


def is_pointwise(conv):
    """Whether conv is a plain width-one convolution: a linear map per frame."""
    return (type(conv) is nn.Conv1d and conv.kernel_size == (1,) and conv.groups == 1
            and _is_plain_conv(conv))


def kv_cache_from_inputs(encoder, cache_last_channel):
    """The accelerated channel cache ([L, B, C, 2 D]) holding what NeMo's
    cache of attention inputs ([L, B, C, D]) would give."""
    blocks = []
    with torch.no_grad():
        for layer, inputs in zip(encoder.layers, cache_last_channel):
            attn = layer.self_attn
            k = _split_heads(attn.linear_k(inputs), attn)
            v = _split_heads(attn.linear_v(inputs), attn)
            blocks.append(torch.stack((k, v), dim=1).reshape(inputs.shape[:2] + (-1,)))
    return torch.stack(blocks)


def _split_heads(x, attn):
    """[B, T, D] -> [B, heads, T, d_k]"""
    return x.view(x.size(0), x.size(1), attn.h, attn.d_k).transpose(1, 2)


def _cached_heads(block, attn):
    """The keys and values in one layer's [B, C, 2 D] cache block, as
    [B, heads, C, d_k] views."""
    kv = block.reshape(block.size(0), 2, attn.h, block.size(1), attn.d_k)
    return kv[:, 0], kv[:, 1]


def _version(tensor):
    # Inference tensors keep no version counter; they cannot be modified in
    # place outside inference mode, and NeMo replaces, never edits, its buffers.
    return None if tensor.is_inference() else tensor._version


class _PositionProjections:
    """Each layer's ``linear_pos`` of the position embeddings, per geometry.

    The entries are valid while the positional buffer and every
    ``linear_pos`` weight are the same tensors, over the same memory, at the
    same version as when they were computed.  The memo holds those tensors
    and their storage, so neither their ids nor their addresses can be
    reused meanwhile.
    """

    def __init__(self):
        self._stamp = None
        self._held = None
        self._entries = collections.OrderedDict()

    def __call__(self, encoder, pos_emb):
        pe = encoder.pos_enc.pe
        if torch.is_grad_enabled() or not _is_view_of(pos_emb, pe):
            return _project_positions(encoder, pos_emb)
        tensors = [pe] + [layer.self_attn.linear_pos.weight for layer in encoder.layers]
        stamp = tuple((id(t), t.data_ptr(), _version(t)) for t in tensors)
        if stamp != self._stamp:
            self._entries.clear()
            self._stamp = stamp
            self._held = [(t, t.untyped_storage()) for t in tensors]
        key = (pos_emb.storage_offset(), pos_emb.shape, pos_emb.stride(), pos_emb.dtype,
               pos_emb.device, torch.is_inference_mode_enabled())
        projections = self._entries.get(key)
        if projections is None:
            projections = _project_positions(encoder, pos_emb)
            self._entries[key] = projections
            if len(self._entries) > _MEMO_SIZE:
                self._entries.popitem(last=False)
        return projections


def _is_view_of(tensor, base):
    return (tensor.device == base.device
            and tensor.untyped_storage().data_ptr() == base.untyped_storage().data_ptr())


def _project_positions(encoder, pos_emb):
    """Per layer: linear_pos(pos_emb) as [heads, d_k, positions]."""
    projections = []
    for layer in encoder.layers:
        attn = layer.self_attn
        p = attn.linear_pos(pos_emb).view(-1, attn.h, attn.d_k)
        projections.append(p.permute(1, 2, 0))
    return projections


class _StreamingStep:
    """The accelerated cache-aware streaming forward of one encoder."""

    def __init__(self, encoder, caches_in_place=False):
        self.encoder = encoder
        self.caches_in_place = caches_in_place
        self.stock_forward_internal = encoder.forward_internal
        self.stock_initial_cache_state = encoder.get_initial_cache_state
        self.positions = _PositionProjections()
        self._context_rows = {}

    def initial_cache_state(self, batch_size=1, dtype=torch.float32, device=None, max_dim=0):
        channel, time, channel_len = self.stock_initial_cache_state(
            batch_size=batch_size, dtype=dtype, device=device, max_dim=max_dim)
        if max_dim > 0:
            channel = kv_cache_from_inputs(self.encoder, channel)
        else:
            channel = channel.new_zeros(channel.shape[:-1] + (2 * channel.size(-1),))
        return channel, time, channel_len

    def forward_internal(self, audio_signal, length, cache_last_channel=None,
                         cache_last_time=None, cache_last_channel_len=None,
                         bypass_pre_encode=False):
        if cache_last_channel is None:
            return self.stock_forward_internal(
                audio_signal, length, bypass_pre_encode=bypass_pre_encode)
        self._check(cache_last_channel)
        encoder = self.encoder
        x, length = self._pre_encode(audio_signal, length, bypass_pre_encode)
        cache_len = encoder.streaming_cfg.last_channel_cache_size
        n_new = x.size(1)
        keep = n_new - encoder.streaming_cfg.cache_drop_size
        if keep < 0:
            raise ValueError("%d new frames, fewer than the cache drop size" % n_new)
        x, pos_emb = encoder.pos_enc(x=x, cache_len=cache_len)
        att_mask, pad_mask = self._masks(length, cache_last_channel_len, cache_len, n_new)
        positions = self.positions(encoder, pos_emb)
        if self.caches_in_place:
            channel_next, time_next = cache_last_channel, cache_last_time
        else:
            channel_next = cache_last_channel.new_empty(cache_last_channel.shape)
            time_next = cache_last_time.new_empty(cache_last_time.shape)
        training = encoder.training
        for lth, layer in enumerate(encoder.layers):
            before = x
            x = _layer_step(layer, x, att_mask, pad_mask, positions[lth],
                            cache_last_channel[lth], cache_last_time[lth],
                            channel_next[lth], time_next[lth], training)
            drop_prob = encoder.layer_drop_probs[lth]
            if training and drop_prob > 0.0:
                x = _stochastic_depth(x, before, drop_prob)
        if encoder.out_proj is not None:
            x = encoder.out_proj(x)
        return (x.transpose(1, 2), length.to(dtype=torch.int64), channel_next, time_next,
                torch.clamp(cache_last_channel_len + keep, max=cache_len))

    def _check(self, cache_last_channel):
        d_model = self.encoder.d_model
        if cache_last_channel.size(-1) != 2 * d_model:
            raise ValueError(
                "the accelerated streaming encoder takes key/value caches of width %d "
                "(from its get_initial_cache_state), not %d"
                % (2 * d_model, cache_last_channel.size(-1)))
        if any(layer.is_adapter_available() for layer in self.encoder.layers):
            raise RuntimeError("adapters were added to an accelerated streaming encoder")

    def _pre_encode(self, audio_signal, length, bypass_pre_encode):
        encoder = self.encoder
        if length is None:
            length = audio_signal.new_full((audio_signal.size(0),), audio_signal.size(-1),
                                           dtype=torch.int64)
        if bypass_pre_encode:
            return audio_signal, length
        x = audio_signal.transpose(1, 2)
        if isinstance(encoder.pre_encode, nn.Linear):
            return encoder.pre_encode(x), length
        x, length = encoder.pre_encode(x=x, lengths=length)
        length = length.to(torch.int64)
        drop = encoder.streaming_cfg.drop_extra_pre_encoded
        if isinstance(drop, RowDrops):
            return drop.apply(x, length)
        if drop > 0:
            x = x[:, drop:, :]
            length = (length - drop).clamp(min=0)
        return x, length

    def _att_context(self):
        encoder = self.encoder
        if encoder.training and len(encoder.att_context_size_all) > 1:
            return random.choices(encoder.att_context_size_all,
                                  weights=encoder.att_context_probs)[0]
        return encoder.att_context_size

    def _masks(self, length, cache_fill, cache_len, n_new):
        """NeMo's (att_mask, pad_mask) over cache + new frames, for the new
        frames' rows only (True: masked)."""
        window = cache_len + n_new
        rows = self._chunk_rows(cache_len, n_new, length.device)
        frame = torch.arange(window, device=length.device)
        valid = (frame < (length + cache_len).unsqueeze(-1)) & (
            frame >= (cache_len - cache_fill).unsqueeze(-1))
        new_valid = valid[:, cache_len:]
        att_mask = ~(rows & new_valid.unsqueeze(-1) & valid.unsqueeze(1))
        return att_mask, ~new_valid

    def _chunk_rows(self, cache_len, n_new, device):
        """Which of the cache + new frames each new frame may attend to, by
        geometry alone: rows of NeMo's own mask for a full window."""
        context = self._att_context()
        key = (tuple(context), cache_len, n_new, device, torch.is_inference_mode_enabled())
        rows = self._context_rows.get(key)
        if rows is None:
            window = cache_len + n_new
            full = torch.full((1,), window, dtype=torch.int64, device=device)
            _, att_mask = self.encoder._create_masks(
                att_context_size=context, padding_length=full, max_audio_length=window,
                offset=torch.zeros_like(full), device=device)
            rows = ~att_mask[0, cache_len:]
            if len(self._context_rows) >= _MEMO_SIZE:
                self._context_rows.clear()
            self._context_rows[key] = rows
        return rows


def _stochastic_depth(x, before, drop_prob):
    if torch.rand(1) < drop_prob:
        return x * 0.0 + before
    return (x - before) / (1.0 - drop_prob) + before


def _identity(x):
    return x


def _layer_step(layer, x, att_mask, pad_mask, positions, kv_cache, conv_cache,
                kv_next, conv_next, training):
    """ConformerLayer.forward on the new frames, writing the layer's next
    caches into kv_next and conv_next."""
    dropout = layer.dropout if training else _identity
    residual = x + dropout(layer.feed_forward1(layer.norm_feed_forward1(x))) * layer.fc_factor
    x = _attention_step(layer.self_attn, layer.norm_self_att(residual), att_mask, positions,
                        kv_cache, kv_next)
    residual = residual + dropout(x)
    x = _conv_step(layer.conv, layer.norm_conv(residual), pad_mask, conv_cache, conv_next)
    residual = residual + dropout(x)
    x = layer.feed_forward2(layer.norm_feed_forward2(residual))
    residual = residual + dropout(x) * layer.fc_factor
    return layer.norm_out(residual)


def _attention_step(attn, x, mask, positions, kv_cache, kv_next):
    """RelPositionMultiHeadAttention of x over the cached keys and values and
    its own; the keys and values of the last C frames go to kv_next."""
    if torch.is_autocast_enabled():
        x = x.to(torch.float32)
    with avoid_float16_autocast_context():
        cached_k, cached_v = _cached_heads(kv_cache, attn)
        k = torch.cat((cached_k, _split_heads(attn.linear_k(x), attn)), dim=2)
        v = torch.cat((cached_v, _split_heads(attn.linear_v(x), attn)), dim=2)
        keep = x.size(1) - attn.cache_drop_size
        next_k, next_v = _cached_heads(kv_next, attn)
        next_k.copy_(k[:, :, keep:keep + next_k.size(2)])
        next_v.copy_(v[:, :, keep:keep + next_v.size(2)])
        q = attn.linear_q(x).view(x.size(0), x.size(1), attn.h, attn.d_k)
        q_u = (q + attn.pos_bias_u).transpose(1, 2)
        matrix_bd = attn.rel_shift(_position_scores(q + attn.pos_bias_v, positions))
        if attn.use_pytorch_sdpa:
            out = _sdpa(attn, q_u, k, v, matrix_bd, mask)
        else:
            out = _attend(attn, q_u, k, v, matrix_bd, mask)
        return attn.linear_out(out.transpose(1, 2).reshape(x.shape))


def _position_scores(q_v, positions):
    """q_v [B, T, heads, d_k] times positions [heads, d_k, P] -> [B, heads, T, P],
    as one product per head for all streams."""
    n_batch, n_new, n_heads, d_k = q_v.shape
    q_v = q_v.permute(2, 0, 1, 3).reshape(n_heads, n_batch * n_new, d_k)
    return torch.bmm(q_v, positions).view(n_heads, n_batch, n_new, -1).transpose(0, 1)


def _attend(attn, q_u, k, v, matrix_bd, mask):
    matrix_ac = torch.matmul(q_u, k.transpose(-2, -1))
    scores = (matrix_ac + matrix_bd[:, :, :, :matrix_ac.size(-1)]) / attn.s_d_k
    mask = mask.unsqueeze(1)
    weights = torch.softmax(scores.masked_fill(mask, -INF_VAL), dim=-1).masked_fill(mask, 0.0)
    if attn.training:
        weights = attn.dropout(weights)
    return torch.matmul(weights, v)


def _sdpa(attn, q_u, k, v, matrix_bd, mask):
    """The same attention through torch's scaled_dot_product_attention."""
    matrix_bd = matrix_bd[:, :, :, :k.size(-2)] * (1 / math.sqrt(q_u.size(-1)))
    mask = mask.unsqueeze(1)
    matrix_bd.masked_fill_(mask, -INF_VAL)
    dropout_p = attn.dropout_rate if attn.training else 0
    if attn.use_pytorch_sdpa_backends:
        with sdpa_kernel(attn.use_pytorch_sdpa_backends):
            out = F.scaled_dot_product_attention(q_u, k, v, attn_mask=matrix_bd,
                                                 dropout_p=dropout_p)
    else:
        out = F.scaled_dot_product_attention(q_u, k, v, attn_mask=matrix_bd, dropout_p=dropout_p)
    fully_masked = torch.all(mask, dim=-1).unsqueeze(-1)
    return out.masked_fill(fully_masked.expand(-1, out.size(1), -1, out.size(-1)), 0.0)


def _conv_step(conv, x, pad_mask, cache, cache_next):
    """ConformerConvolution of the new frames, channels last ([B, T, D])."""
    x = F.glu(_pointwise(conv.pointwise_conv1, x), dim=-1)
    x = x.masked_fill(pad_mask.unsqueeze(-1), 0.0)
    x = _causal_depthwise(conv.depthwise_conv, x.transpose(1, 2), cache, cache_next)
    if conv.norm_type == "layer_norm":
        x = conv.batch_norm(x.transpose(1, 2))
    else:
        x = conv.batch_norm(x).transpose(1, 2)
    return _pointwise(conv.pointwise_conv2, conv.activation(x))


def _pointwise(conv, x):
    """A width-one convolution of channels-last x."""
    channels_last = getattr(conv, "channels_last", None)  # parakeet.engine.quantize's
    if channels_last is not None:
        return channels_last(x)
    return F.linear(x, conv.weight.squeeze(-1), conv.bias)


def _causal_depthwise(dw, x, cache, cache_next):
    """CausalConv1D.forward of x [B, D, T] with its cache [B, D, K - 1]; the
    next cache goes to cache_next."""
    if dw._right_padding:
        x = F.pad(x, (0, dw._right_padding))
    x = torch.cat((cache, x), dim=-1)
    kept = x[:, :, :-dw.cache_drop_size] if dw.cache_drop_size > 0 else x
    cache_next.copy_(kept[:, :, -cache.size(-1):])
    if x.dtype != torch.float32:
        # Reduced precision has no fast path for the many tiny products
        # below (a bfloat16 step of 16 streams spent 23 ms in them), while
        # its depthwise convolution is quick.
        return F.conv1d(x, dw.weight, dw.bias, groups=dw.groups)
    width = dw.kernel_size[0]
    windows = x.unfold(2, width, 1)  # [B, D, T, K]
    out = torch.matmul(windows, dw.weight.view(-1, width, 1)).squeeze(-1)
    return out if dw.bias is None else out + dw.bias.unsqueeze(-1)
