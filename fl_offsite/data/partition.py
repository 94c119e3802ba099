"""Split a task's training examples among data owners with flwr-datasets partitioners."""
from __future__ import annotations

from typing import TYPE_CHECKING

from fl_offsite.errors import UserError

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner


def partition_indices(labels: list[int], num_partitions: int, partition_id: int, partitioner: str,
                      alpha: float, seed: int) -> list[int]:
    """Indices (into ``labels``) of partition ``partition_id``: IID or Dirichlet(alpha) over labels."""
    if not 0 <= partition_id < num_partitions:
        raise UserError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    if len(labels) < num_partitions:
        raise UserError(f"{len(labels)} training examples cannot fill {num_partitions} partitions: "
                        "use fewer clients or a larger task")
    # Imported here, as flwr-datasets in _partitioner: together (seaborn, pandas, scipy) 1-2 s of CPU for every
    # process that imports this module and never partitions (a ClientApp answering queries, the CLI).
    from datasets import Dataset

    dataset = Dataset.from_dict({"label": labels, "index": list(range(len(labels)))})
    part = _partitioner(partitioner, num_partitions, alpha, seed, len(labels))
    part.dataset = dataset
    return list(part.load_partition(partition_id)["index"])


def _partitioner(name: str, num_partitions: int, alpha: float, seed: int, size: int) -> Partitioner:
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if name == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if name == "dirichlet":
        min_size = max(1, min(10, size // (4 * num_partitions)))
        return DirichletPartitioner(num_partitions=num_partitions, partition_by="label", alpha=alpha,
                                    min_partition_size=min_size, self_balancing=False, seed=seed)
    raise UserError(f"unknown partitioner {name!r}: use 'iid' or 'dirichlet'")
