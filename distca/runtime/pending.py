"""What a started CAD round hands back: ``wait()`` finishes the round and returns this rank's results.

Every data plane's client (in-place, the pool's collective group) keeps its own way of finishing a round
(``_finish``) and fills ``dst`` by role; these mixins give the two passes their one ``wait``."""

from __future__ import annotations

import torch


class ForwardWait:
    """``wait() -> (out, lse)``."""

    dst: dict[str, torch.Tensor]  # and ``_finish()``, from the client's own pending-round class

    def wait(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(out, lse)``."""
        self._finish()
        return self.dst["out"], self.dst["lse"]


class BackwardWait:
    """``wait() -> (dq, dk, dv)``."""

    dst: dict[str, torch.Tensor]  # and ``_finish()``, from the client's own pending-round class

    def wait(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's ``(dq, dk, dv)``."""
        self._finish()
        return self.dst["dq"], self.dst["dk"], self.dst["dv"]
