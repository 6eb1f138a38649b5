"""Attention servers: the request loop of one server (``loop``: fused varlen calls over the rows many
trainers send), the plan layout a server registers (``layout``), plain server processes for torchrun
nodes, tests and benchmarks (``processes``: start, collect addresses, always shut down), the Ray-managed
pool (``pool``: start, health-check, restart, shut down), and the control requests both use
(``control``: one request and its reply, stopping servers, removing a dead server's ipc socket). Rows that
move by ``torch.distributed`` all-to-all go through ``exchange`` (in-place servers and the pool's collective data
plane alike); ``compute`` is the fused call every data plane shares, and ``group_plane`` a server's data-plane
groups with the trainers (one worker thread per group)."""
