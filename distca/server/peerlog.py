"""What a server says about its peers, kept safe and bounded: peer-controlled text (error messages that quote a
header, identities) escaped and cut short before it reaches a log line or an ERROR reply, and log lines limited
per peer, so a flood of bad messages cannot fill a disk or forge log lines."""

from __future__ import annotations

import logging
import time
import traceback
from collections import OrderedDict

MAX_TEXT = 300  # characters of peer-controlled text in one log line
MAX_REPLY = 1000  # characters of an ERROR reply's text
MAX_TRACE = 4000  # characters of a traceback, escaped into its log line


def peer_text(value: object, limit: int = MAX_TEXT) -> str:
    """``value`` as one printable ASCII line: control characters, non-ASCII and backslashes escaped
    (``\\n``, ``\\x1b``, ``\\u2028``), cut at ``limit`` characters with a note of how much was left out."""
    text = value if isinstance(value, str) else str(value)
    head = text[: limit * 2].encode("unicode_escape").decode("ascii")  # escaping at most quadruples a character
    if len(head) <= limit and len(text) <= limit * 2:
        return head
    return f"{head[:limit]}... ({len(text)} characters)"


def peer_name(identity: bytes | None) -> str:
    """A ROUTER identity (chosen by the peer, up to 255 bytes) as a short hex label."""
    if identity is None:
        return "?"
    return identity[:8].hex() + ("+" if len(identity) > 8 else "")


class PeerLog:
    """Log lines about peers, at most ``burst`` per peer in each ``period_s`` (and at most ``burst * 4`` over all
    peers, since a peer can change identity by reconnecting); what was held back is counted and said in the
    peer's next line that gets through. The peers tracked are bounded (least recently seen out)."""

    def __init__(self, logger: logging.Logger, burst: int = 5, period_s: float = 10.0, max_peers: int = 1024):
        self.log, self.burst, self.period_s, self.max_peers = logger, burst, period_s, max_peers
        self.peers: OrderedDict[bytes, list] = OrderedDict()  # identity -> [window start, lines, held back]
        self.total = [0.0, 0, 0]
        self.suppressed = 0  # lines held back since the server started

    def _allow(self, state: list, limit: int, now: float) -> bool:
        if now - state[0] >= self.period_s:
            state[0], state[1] = now, 0
        if state[1] >= limit:
            state[2] += 1
            return False
        state[1] += 1
        return True

    def line(self, level: int, identity: bytes | None, text: str, exc_info: BaseException | None = None) -> bool:
        """Log ``text`` (already made safe with :func:`peer_text`) about ``identity``'s message if its budget
        allows; returns whether it was logged."""
        now = time.monotonic()
        key = identity or b""
        state = self.peers.get(key)
        if state is None:
            state = self.peers[key] = [now, 0, 0]
            while len(self.peers) > self.max_peers:
                self.peers.popitem(last=False)
        self.peers.move_to_end(key)
        if not (self._allow(state, self.burst, now) and self._allow(self.total, self.burst * 4, now)):
            self.suppressed += 1
            return False
        held, state[2] = state[2], 0
        note = f" ({held} earlier lines about this peer held back)" if held else ""
        if exc_info is not None:  # the traceback too, escaped into the same line (its message may quote the peer)
            note += " | " + peer_text("".join(traceback.format_exception(exc_info)), MAX_TRACE)
        self.log.log(level, "peer %s: %s%s", peer_name(identity), text, note)
        return True
