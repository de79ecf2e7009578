"""An expert fine-tuning worker: ``python -m mergeflow.zoo.worker ROOT TASK SIZE_JSON`` prints its result as JSON.

``build_zoo(jobs=N)`` starts these in fresh interpreters (see ``_finetune_in_workers``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mergeflow.zoo.build import ZooSize, _no_hf_progress_bars, finetune_expert


def main(argv: list[str]) -> int:
    root, task, size_file = argv
    size = ZooSize.from_json(json.loads(Path(size_file).read_text()))
    with _no_hf_progress_bars():
        info = finetune_expert(root, task, size)
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
