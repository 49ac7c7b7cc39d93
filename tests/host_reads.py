"""Count the reads of a tensor into Python: each is a host sync on a GPU."""

import torch


def count_host_reads(monkeypatch) -> list[str]:
    """Record every ``.item()`` and ``bool()`` of a tensor from now on (until
    ``monkeypatch.undo()``): each one is a host synchronisation on a GPU and a
    graph break under ``torch.compile``. Returns the list the reads go to."""
    reads: list[str] = []
    real_item, real_bool = torch.Tensor.item, torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "item",
                        lambda t: reads.append("item") or real_item(t))
    monkeypatch.setattr(torch.Tensor, "__bool__",
                        lambda t: reads.append("bool") or real_bool(t))
    return reads
