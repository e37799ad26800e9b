"""
The statistics of the bench's report: percentiles, a result's latency from
the audio it claims (its ``audio_ms``) and the send times of the audio, and
durations summarised in milliseconds.
"""

import bisect
import math


def percentile(values, q):
    """The q-th percentile (0 to 100) of values, interpolated linearly between
    the nearest ranks (numpy's default method); None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def result_latencies(results, cumulative_ms, sent_at, tolerance_ms=0.5):
    """The latency of each result, in the clock's units, or None where no
    message sent so far holds the audio it claims.

    results are ``(arrival, audio_ms)`` pairs; cumulative_ms[k] is the audio,
    in ms from the stream's first sample, that messages 0 to k hold together;
    sent_at[k] is when message k was sent.  A result's latency is its arrival
    minus the send time of the first message whose cumulative audio reaches
    its audio_ms (within tolerance_ms, for rounding).
    """
    latencies = []
    for arrival, audio_ms in results:
        if audio_ms is None or not math.isfinite(audio_ms):
            latencies.append(None)
            continue
        k = bisect.bisect_left(cumulative_ms, audio_ms - tolerance_ms)
        latencies.append(arrival - sent_at[k] if k < len(sent_at) else None)
    return latencies


def milliseconds(seconds):
    """Seconds as milliseconds, rounded to the microsecond; None stays None."""
    return None if seconds is None else round(seconds * 1000.0, 3)


def spread(values_s, points=(50, 95, 99)):
    """Percentiles and max of durations in seconds, as a dict of ms."""
    summary = {"count": len(values_s)}
    for q in points:
        summary["p%d" % q] = milliseconds(percentile(values_s, q))
    summary["max"] = milliseconds(max(values_s)) if values_s else None
    return summary
