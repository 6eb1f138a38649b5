"""The trainer's side of CAD: the clients that send a rank's rows of a plan to the attention servers and
collect the results (``client``: ZeroMQ frames or same-host shared memory; ``group_client``: the pool's
collective data plane; ``inplace``: every trainer its own server; ``pending``: what a started round hands
back), CAD attention as an autograd function behind the model's core-attention interface
(``cad_attention``), two nano-batches overlapping attention with linear work (``pingpong``), and plan
execution in one process (``plan_exec``: the oracle the networked path must match, and the tasks a plan
keeps on the trainer)."""
