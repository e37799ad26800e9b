"""
The bench's report: what its terms mean (:data:`DEFINITIONS`), whether a
run passes (:func:`verdict`), and the report as text: a table row per run,
the details under the table, the one-line summary and the ceiling's lines.
"""

#: What the report's terms mean, as the report states them.
DEFINITIONS = {
    "latency": "arrival of a result minus the send time of the audio message "
               "whose cumulative audio first reached the result's audio_ms",
    "time_to_final": "arrival of the is_final result minus the send time of the "
                     "message with \"final\": true",
    "kept_up": "the stream opened, got no error, got its final result, and every "
               "result's latency and its time-to-final were <= --keep-up-ms",
    "bench_lateness": "how long after its scheduled time (stream start + k * chunk) "
                      "the bench sent each audio message",
}


def verdict(run, p95_ms):
    """(passed, why): whether every stream kept up with p95 latency <= p95_ms,
    in a measurement the bench kept to its schedule."""
    if run["bench"]["behind"]:
        return False, "invalid: the bench fell behind"
    if run["errors"]["count"]:
        return False, "errors"
    if run["kept_up"] < run["streams"]:
        return False, "%d did not keep up" % (run["streams"] - run["kept_up"],)
    p95 = run["latency_ms"]["p95"]
    if p95 is None:
        return False, "no results"
    if p95 > p95_ms:
        return False, "p95 > %g ms" % (p95_ms,)
    return True, "pass"


def _fmt_ms(value):
    """Milliseconds as the table shows them: whole, or '-' for none."""
    return "-" if value is None else "%.0f" % (value,)


def human_bytes(n):
    """A size in MiB or GiB, or '-' for none."""
    if n is None:
        return "-"
    if abs(n) >= 1 << 30:
        return "%.2f GiB" % (n / float(1 << 30),)
    return "%.1f MiB" % (n / float(1 << 20),)


def framing_words(framing):
    """How audio goes on the wire, in words."""
    return {"tcp": "TCP, newline-delimited JSON", "ws": "WebSocket, base64 in JSON",
            "ws-binary": "WebSocket, binary pcm16"}[framing]


#: The table's header: one row per run under it (:func:`table_row`).
TABLE_HEADER = ("%6s %6s %7s %7s %7s %7s %7s %7s %7s %7s %6s %8s %7s %10s  %s" % (
    "N", "opened", "kept-up", "results", "p50 ms", "p95 ms", "p99 ms", "max ms",
    "ttf p50", "ttf p95", "errors", "late max", "srv cpu", "srv rss", "verdict"))


def table_row(run):
    """One run's line of the table."""
    server = run["server"] or {}
    cpu = server.get("cpu_percent")
    return "%6d %6d %7s %7d %7s %7s %7s %7s %7s %7s %6d %8s %7s %10s  %s" % (
        run["streams"], run["opened"], "%d/%d" % (run["kept_up"], run["streams"]),
        run["results"], _fmt_ms(run["latency_ms"]["p50"]), _fmt_ms(run["latency_ms"]["p95"]),
        _fmt_ms(run["latency_ms"]["p99"]), _fmt_ms(run["latency_ms"]["max"]),
        _fmt_ms(run["time_to_final_ms"]["p50"]), _fmt_ms(run["time_to_final_ms"]["p95"]),
        run["errors"]["count"], _fmt_ms(run["bench"]["lateness_ms"]["max"]),
        "-" if cpu is None else "%.0f%%" % cpu,
        human_bytes(server.get("rss_peak_bytes")), run["verdict"])


def run_details(run):
    """Lines on one run beyond its table row."""
    lines = ["N=%d: %.1f s; %d of %d streams finished; connect to hello p50 %s ms, max %s ms; "
             "bench lateness p50 %s ms, p99 %s ms, max %s ms; bench cpu %s%%" % (
                 run["streams"], run["wall_s"], run["finished"], run["streams"],
                 _fmt_ms(run["hello_ms"]["p50"]), _fmt_ms(run["hello_ms"]["max"]),
                 _fmt_ms(run["bench"]["lateness_ms"]["p50"]),
                 _fmt_ms(run["bench"]["lateness_ms"]["p99"]),
                 _fmt_ms(run["bench"]["lateness_ms"]["max"]),
                 _fmt_ms(run["bench"]["cpu_percent"]))]
    if run["bench"]["behind"]:
        lines.append("  !!! INVALID MEASUREMENT: the bench itself fell behind its schedule "
                     "by %s ms, more than one %d ms chunk: it could not offer the load. "
                     "Run fewer streams per bench process, or the bench on another machine."
                     % (_fmt_ms(run["bench"]["lateness_ms"]["max"]), run["chunk_ms"]))
    server = run["server"]
    if server:
        lines.append("  server pid %d: cpu %s%% (100%% = one core); rss %s before, %s peak, "
                     "%s at the end; %s per stream (peak - before) / N%s" % (
                         server["pid"], _fmt_ms(server["cpu_percent"]),
                         human_bytes(server["rss_before_bytes"]),
                         human_bytes(server["rss_peak_bytes"]),
                         human_bytes(server["rss_end_bytes"]),
                         human_bytes(server["rss_per_stream_bytes"]),
                         "; " + server["note"] if server.get("note") else ""))
    if run["unmatched_results"]:
        lines.append("  %d results had no audio_ms that matches the audio sent: no latency "
                     "for them" % (run["unmatched_results"],))
    if run["errors"]["count"]:
        lines.append("  errors: %d, first: %s" % (
            run["errors"]["count"], "; ".join(run["errors"]["first"])))
    return lines


def summary_line(run, transport):
    """The one-line summary of a run."""
    server = run["server"] or {}
    line = ("bench: N=%d %s kept-up %d/%d p50 %s ms p95 %s ms p99 %s ms ttf p50 %s ms "
            "errors %d") % (
        run["streams"], transport, run["kept_up"], run["streams"],
        _fmt_ms(run["latency_ms"]["p50"]), _fmt_ms(run["latency_ms"]["p95"]),
        _fmt_ms(run["latency_ms"]["p99"]), _fmt_ms(run["time_to_final_ms"]["p50"]),
        run["errors"]["count"])
    if server.get("cpu_percent") is not None:
        line += " server-cpu %.0f%% rss %s" % (server["cpu_percent"],
                                              human_bytes(server["rss_peak_bytes"]))
    if run["bench"]["behind"]:
        line += " INVALID (bench behind by %s ms)" % (
            _fmt_ms(run["bench"]["lateness_ms"]["max"]),)
    return line


def ceiling_lines(result):
    """The lines on one probe of the in-process ceiling."""
    paced = result["paced"]
    return [
        "ceiling N=%d lockstep: step p50 %s ms, p95 %s ms over %d steps; chunk %s ms: %s" % (
            result["streams"], _fmt_ms(result["step_p50_ms"]), _fmt_ms(result["step_p95_ms"]),
            result["steps"], _fmt_ms(result["chunk_ms"]),
            "a step of N streams fits in one chunk" if result["fits"]
            else "a step of N streams does NOT fit in one chunk"),
        "ceiling N=%d paced: latency p50 %s ms, p95 %s ms, max %s ms; ttf p50 %s ms: %s" % (
            result["streams"], _fmt_ms(paced["latency_p50_ms"]),
            _fmt_ms(paced["latency_p95_ms"]), _fmt_ms(paced["latency_max_ms"]),
            _fmt_ms(paced["ttf_p50_ms"]), "pass" if result["passed"] else "fail")]
