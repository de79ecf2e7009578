"""An expert fine-tuning worker: ``python -m mergeflow.zoo.worker ROOT TASK SIZE_JSON`` prints its result as JSON.

``build_zoo(jobs=N)`` starts these in fresh interpreters (see ``_finetune_in_workers``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import transformers.utils.logging as hf_logging

from mergeflow.zoo.build import ZooSize, finetune_expert


def main(argv: list[str]) -> int:
    root, task, size_file = argv
    size = ZooSize.from_json(json.loads(Path(size_file).read_text()))
    # transformers' "Loading weights" bars would clutter the build's own progress; this process exits after one
    # expert, so there is nothing to restore
    hf_logging.disable_progress_bar()
    info = finetune_expert(root, task, size)
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
