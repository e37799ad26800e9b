"""
What the server says about itself to probes and load balancers: the status
port's JSON line, HAProxy's agent-check line, and ``/healthz``/``/readyz``.
"""

import attr

from . import messages

LOADING = "loading"
READY = "ready"
FULL = "full"
DRAINING = "draining"


@attr.s
class Health:
    """The server's state, read from its stream registry."""

    registry = attr.ib()
    #: Set once the model is loaded and warm.
    loaded = attr.ib(default=False)

    @property
    def state(self):
        if not self.loaded:
            return LOADING
        if self.registry.closed:
            return DRAINING
        if self.registry.free <= 0:
            return FULL
        return READY

    @property
    def ready(self):
        """Whether a new stream would be accepted now."""
        return self.state == READY

    def status(self):
        """The status port's message."""
        return messages.status(len(self.registry), self.registry.capacity, self.state,
                               self.registry.model)

    def agent_reply(self):
        """One line for HAProxy's agent-check.

        Ready: ``up ready W% maxconn:N``, where W is the share of slots free
        (so that HAProxy's weights follow the free capacity; 0% when full, so
        that new streams go elsewhere while this server's continue) and N the
        server's stream limit.  Draining: ``drain``, new streams go elsewhere
        and the open ones finish.  Loading: ``down``, until the model has
        been loaded and warmed up."""
        state = self.state
        if state == LOADING:
            return "down #loading the model\n"
        if state == DRAINING:
            return "drain #shutting down\n"
        registry = self.registry
        weight = (100 * registry.free) // registry.capacity
        if registry.free and not weight:
            weight = 1
        return "up ready %d%% maxconn:%d\n" % (weight, registry.capacity)
