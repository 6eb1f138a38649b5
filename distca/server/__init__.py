"""Attention servers: the request loop of one server (``loop``: fused varlen calls over the rows many trainers
send), the plan layout a server registers (``layout``), and the Ray-managed pool (``pool``: start, health-check,
restart, shut down)."""
