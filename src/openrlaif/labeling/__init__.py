"""AI labeling: judges turned into labeled files, and the labeler measured against people.

- `jobs`: `label_pairs` (soft labels, both orders) and `score_responses` (d-RLAIF scores),
  resumable and cached, rows the judge left undecided listed apart (`undecided_path`);
  `load_labeled` reads a labeled file back;
- `judge`: `open_judge` by name or YAML file with its judgment cache; `server_stats`,
  `reading_stats` (labels an HTTP judge read beyond the top tokens);
- `alignment`: the labeler against human labels (`alignment_metrics`, bootstrap CIs, position
  and length bias, calibration; the per-pair measures are `judges.reliability`'s) and the whole
  `align` job (`measure_alignment`);
- `shards`: `--shard I/N`, the pairs of one shard by a stable hash of their id (`shard_of`);
  `merge`: the parts of a sharded labeling checked and joined (`merge_labeled`).
"""

from openrlaif.judges.reliability import preferred_slot, prefers_longer, same_position_preferred
from openrlaif.labeling.alignment import (
    AlignmentResult,
    alignment_metrics,
    bootstrap_ci,
    expected_calibration_error,
    measure_alignment,
)
from openrlaif.labeling.jobs import (
    JobResult,
    label_pairs,
    load_labeled,
    parse_labeled,
    print_undecided,
    score_responses,
    undecided_path,
)
from openrlaif.labeling.judge import open_judge, reading_stats, server_stats
from openrlaif.labeling.merge import MergeResult, merge_labeled
from openrlaif.labeling.shards import Shard, in_shard, parse_shard, shard_of

__all__ = [
    "AlignmentResult",
    "JobResult",
    "MergeResult",
    "Shard",
    "alignment_metrics",
    "bootstrap_ci",
    "expected_calibration_error",
    "in_shard",
    "label_pairs",
    "load_labeled",
    "measure_alignment",
    "merge_labeled",
    "open_judge",
    "parse_labeled",
    "parse_shard",
    "preferred_slot",
    "prefers_longer",
    "print_undecided",
    "reading_stats",
    "same_position_preferred",
    "score_responses",
    "server_stats",
    "shard_of",
    "undecided_path",
]
