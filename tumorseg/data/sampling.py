"""Training samplers: hard examples drawn more often, or every class equally often."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch


class HardExampleSampler(torch.utils.data.Sampler[int]):
    """Draws an epoch of `count` positions with replacement, favouring the slices training finds hard.

    Each position's probability is (1 - hard_share) / count plus hard_share
    times its share of the summed latest training losses, so a slice whose
    loss is three times the average is drawn about (1 + 2 * hard_share)
    times as often and a solved one about (1 - hard_share) times. A slice
    not yet trained on counts as the average of those that were (the first
    epoch draws uniformly). The DataLoader takes batches of `batch_size`
    from `order` in sequence, so batch b holds order[b * batch_size:][:batch_size];
    `record(b, losses)` stores their losses.

    Args:
        count: number of training slices (dataset positions 0 .. count-1).
        hard_share: 0 (uniform with replacement) to 1 (in proportion to the loss alone).
        batch_size: the DataLoader's batch size.
        generator: the loader's generator, so a resumed run draws the same epochs.
    """

    def __init__(self, count: int, hard_share: float, batch_size: int, generator: torch.Generator):
        if count < 1 or not 0 <= hard_share <= 1 or batch_size < 1:
            raise ValueError(f"HardExampleSampler needs count >= 1, 0 <= hard_share <= 1 and batch_size >= 1, "
                             f"got {count}, {hard_share}, {batch_size}")
        self.count, self.hard_share, self.batch_size, self.generator = count, hard_share, batch_size, generator
        self.losses = torch.full((count,), float("nan"))  # latest training loss of each position
        self.order = torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return self.count

    def probabilities(self) -> torch.Tensor:
        """Each position's chance per draw (sums to 1)."""
        known = ~torch.isnan(self.losses)
        losses = torch.where(known, self.losses, self.losses[known].mean() if known.any() else 1.0).clamp(min=0)
        total = losses.sum()
        loss_share = losses / total if total > 0 else torch.full_like(losses, 1 / self.count)
        return (1 - self.hard_share) / self.count + self.hard_share * loss_share

    def __iter__(self) -> Iterator[int]:
        self.order = torch.multinomial(self.probabilities(), self.count, replacement=True, generator=self.generator)
        return iter(self.order.tolist())

    def record(self, batch: int, losses: torch.Tensor) -> None:
        """Store the training losses of batch number `batch` (0-based) of the current epoch."""
        positions = self.order[batch * self.batch_size:][:len(losses)]
        if len(positions) != len(losses):
            raise ValueError(f"batch {batch} holds {len(positions)} positions of this epoch, got {len(losses)} losses")
        self.losses[positions] = losses.detach().float().cpu()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The latest losses: with the loader's generator, all a resumed run needs to draw the same epochs."""
        return {"losses": self.losses.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take the losses a checkpoint saved (refused when they cover another number of slices)."""
        if state["losses"].shape != self.losses.shape:
            raise ValueError(f"saved sampler losses cover {len(state['losses'])} slices, this split has {self.count}")
        self.losses = state["losses"].clone().float()


class BalancedSampler(torch.utils.data.Sampler[int]):
    """Draws an epoch of `len(labels)` positions in which every class of `labels` comes up equally often (within 1).

    Each of the K classes gets count // K draws and count % K of them,
    chosen at random each epoch, one more. Inside a class the draws follow
    a shuffled cycle through its positions, without replacement, continued
    across epochs and reshuffled when used up: a large class shows every
    slice once before any slice twice, a small one repeats its slices
    evenly, never one slice many times by chance (as drawing with
    replacement would). The epoch's draws are then shuffled together.
    Everything random comes from `generator`; the cycles are `state_dict`,
    so with the generator's state a resumed run draws the same epochs.

    Args:
        labels: the class of each training position 0 .. count-1 (any sortable values, e.g. class indices).
        generator: the loader's generator, whose state checkpoints save.
    """

    def __init__(self, labels: Sequence, generator: torch.Generator):
        if not labels:
            raise ValueError("BalancedSampler needs at least one labelled position")
        self.count, self.generator = len(labels), generator
        classes = sorted(set(labels))
        self.members = [torch.tensor([i for i, label in enumerate(labels) if label == c]) for c in classes]
        self.cycles = [torch.empty(0, dtype=torch.long) for _ in classes]  # each class's current shuffled order
        self.cursors = [0] * len(classes)  # positions of its cycle already drawn

    def __len__(self) -> int:
        return self.count

    def quotas(self) -> list[int]:
        """Draws of each class this epoch: count // K, plus one for count % K classes chosen at random."""
        base, extra = divmod(self.count, len(self.members))
        lucky = set(torch.randperm(len(self.members), generator=self.generator)[:extra].tolist())
        return [base + (k in lucky) for k in range(len(self.members))]

    def _draw(self, k: int, number: int) -> list[int]:
        """The next `number` positions of class k's cycle, reshuffling it whenever it is used up."""
        drawn: list[int] = []
        while len(drawn) < number:
            if self.cursors[k] == len(self.cycles[k]):
                members = self.members[k]
                self.cycles[k] = members[torch.randperm(len(members), generator=self.generator)]
                self.cursors[k] = 0
            taken = self.cycles[k][self.cursors[k]:self.cursors[k] + number - len(drawn)]
            drawn += taken.tolist()
            self.cursors[k] += len(taken)
        return drawn

    def __iter__(self) -> Iterator[int]:
        # The whole epoch is drawn here, so the state after it is settled before its checkpoint is written.
        draws = torch.tensor([p for k, quota in enumerate(self.quotas()) for p in self._draw(k, quota)])
        return iter(draws[torch.randperm(self.count, generator=self.generator)].tolist())

    def state_dict(self) -> dict[str, Any]:
        """Each class's current cycle and how far it was drawn: with the loader's generator, all a resume needs."""
        return {"cycles": [cycle.clone() for cycle in self.cycles], "cursors": list(self.cursors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the cycles a checkpoint saved; refused (ValueError) when they do not fit these labels."""
        cycles, cursors = state["cycles"], state["cursors"]
        fits = len(cycles) == len(cursors) == len(self.members) and all(
            0 <= cursor <= len(cycle) and (len(cycle) == 0 or sorted(cycle.tolist()) == members.tolist())
            for cycle, cursor, members in zip(cycles, cursors, self.members, strict=True))
        if not fits:
            raise ValueError(f"saved balanced-sampler cycles do not fit this split's {len(self.members)} classes "
                             f"of {self.count} slices")
        self.cycles = [torch.as_tensor(cycle, dtype=torch.long).cpu() for cycle in cycles]
        self.cursors = [int(cursor) for cursor in cursors]
