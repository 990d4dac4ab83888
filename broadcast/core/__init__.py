"""The kernel every layer imports: the domain, the ports, settings, constants, the event shapes and reach tallies."""
