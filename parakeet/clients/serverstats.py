"""
The server process as the bench sees it from outside, through ``/proc``
(when it runs on the same machine): its CPU time and resident memory
(:func:`process_cpu_seconds`, :func:`process_rss_bytes`), both over a run
(:class:`ServerSampler`), and waiting until it is idle between probes
(:func:`wait_until_idle`).
"""

import os

from twisted.internet import defer, task


def process_cpu_seconds(pid):
    """User plus system CPU time of process pid, in seconds (/proc/PID/stat)."""
    with open("/proc/%d/stat" % (pid,)) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime and stime fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_bytes(pid):
    """Resident memory of process pid, in bytes (VmRSS of /proc/PID/status)."""
    with open("/proc/%d/status" % (pid,)) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


#: Seconds over which --find-max finds the server idle (or not).
IDLE_WINDOW = 0.5


@defer.inlineCallbacks
def wait_until_idle(reactor, cpu_seconds, busy=0.2, window=IDLE_WINDOW, limit=60.0):
    """Wait until a process uses less than busy of a core over window
    seconds, or for limit seconds at most; cpu_seconds() reads its CPU time.
    The Deferred fires with the seconds waited."""
    started = reactor.seconds()
    before = cpu_seconds()
    while True:
        yield task.deferLater(reactor, window, lambda: None)
        now = cpu_seconds()
        if now - before < busy * window or reactor.seconds() - started >= limit:
            return reactor.seconds() - started
        before = now


class ServerSampler:
    """The server process's CPU time over a run, and its resident memory
    before, at the peak (sampled every interval seconds) and at the end."""

    def __init__(self, reactor, pid, interval=0.5):
        self.reactor = reactor
        self.pid = pid
        self.interval = interval
        self.gone = False

    def start(self):
        self.cpu_before = process_cpu_seconds(self.pid)
        self.rss_before = self.rss_peak = process_rss_bytes(self.pid)
        self._loop = task.LoopingCall(self._sample)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False)

    def _sample(self):
        try:
            rss = process_rss_bytes(self.pid)
        except OSError:
            self.gone = True
            self._loop.stop()
            return
        self.rss_peak = max(self.rss_peak or 0, rss or 0)

    def stop(self, wall_s, n_streams):
        if self._loop.running:
            self._loop.stop()
        report = {"pid": self.pid, "cpu_percent": None, "rss_before_bytes": self.rss_before,
                  "rss_peak_bytes": self.rss_peak, "rss_end_bytes": None,
                  "rss_per_stream_bytes": None}
        try:
            cpu = process_cpu_seconds(self.pid)
            report["rss_end_bytes"] = process_rss_bytes(self.pid)
        except OSError:
            report["note"] = "the server process ended during the run"
            return report
        report["rss_peak_bytes"] = max(self.rss_peak or 0, report["rss_end_bytes"] or 0)
        report["cpu_percent"] = round(100.0 * (cpu - self.cpu_before) / wall_s, 1)
        report["rss_per_stream_bytes"] = round(
            (report["rss_peak_bytes"] - self.rss_before) / n_streams)
        return report
