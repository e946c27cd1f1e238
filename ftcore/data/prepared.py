"""What the data path produces: the tokenized training and held-out sets, with their counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ftcore.data.records import Problem


@dataclass
class DataStats:
    records: int = 0
    bad_records: int = 0
    examples: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_unsupervised: int = 0
    split_documents: int = 0           # texts longer than max_length split into chunks (Example.split_long)
    packing_efficiency: float = 1.0    # share of computed positions that are real tokens
    padded_efficiency: float = 1.0     # the same, were batches padded instead of packed
    cached: bool = False
    per_dataset: dict[str, int] = field(default_factory=dict)                # examples kept per dataset
    per_dataset_records: dict[str, int] = field(default_factory=dict)        # records read per dataset
    mixture: list[dict[str, Any]] = field(default_factory=list)   # per training dataset: read, kept, sampled, share
    audit: dict[str, Any] = field(default_factory=dict)           # the data-quality audit (ftcore.data.audit)
    preference: dict[str, Any] = field(default_factory=dict)   # pair statistics of a preference objective

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PreparedData:
    """What a run trains on: a supervised run's datasets hold ``input_ids`` and ``labels``; an objective with
    its own data path (``ftcore_prepare_data``) holds what its trainer takes (DPO: prompt, chosen, rejected and
    their token ids ``prompt_ids``, ``chosen_ids``, ``rejected_ids``)."""

    train: Any                 # datasets.Dataset with input_ids, labels
    eval: Any | None
    stats: DataStats
    problems: list[Problem] = field(default_factory=list)
