"""The trainer's side of CAD: the client that sends a rank's rows of a plan to the attention servers and
collects the results (``client``: ZeroMQ frames; ``group_client``: the pool's collective data plane; ``inplace``:
every trainer its own server), CAD attention as an autograd function behind the model's core-attention
interface (``cad_attention``), two nano-batches overlapping attention with linear work (``pingpong``), and
plan execution in one process (``plan_exec``: the oracle the networked path must match, and the tasks a
plan keeps on the trainer)."""
