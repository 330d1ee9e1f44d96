"""Everything the keeper does to a whole host, for the CLI and the TUI alike.

``service.HostService`` is the one entry both front ends call; ``rollout`` runs hosts in health-gated
batches, ``health_gate`` checks a host after a change, ``worker_converge`` brings a host's workers to the
inventory through the queen, ``remote_hive`` acts on one installed hive, ``probe`` asks a host what the
queen cannot see. ``deploy/`` below it holds the transports, facts, plans and steps.
"""
