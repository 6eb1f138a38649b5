"""Attention servers: the request loop (``loop``); the Ray-managed pool arrives with issue #4's rest."""
