"""Plan execution on trainers and servers (CAD attention functions and ping-pong arrive with the
transport; ``plan_exec`` runs a plan in one process, the oracle the networked runtime must match)."""
