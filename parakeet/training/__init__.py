"""
Making the demo model (docs/demo-model.rst): its corpus, the synthesisers
that read it, what is done to their speech, and a transducer loss fast on
CPUs.  Nothing in the server, the engine or the clients imports them.
"""
