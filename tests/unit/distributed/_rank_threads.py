"""One rank of ``embedtune.train``'s torchrun path, then a record of the threads still running.

Usage (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment)::

    python _rank_threads.py OUT recipe.yaml [overrides...]

Runs ``embedtune.train.main`` exactly as a torchrun rank would, and after it returns writes the names
of this process's live threads to ``OUT/threads_rank{RANK}.json`` (Linux: from /proc/self/task).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _dist_harness import dump_stacks_on_sigusr1


def thread_names() -> list[str]:
    tasks = Path("/proc/self/task")
    return sorted((tasks / t / "comm").read_text().strip() for t in os.listdir(tasks))


def main() -> int:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    dump_stacks_on_sigusr1()
    from embedtune.train import main as train_main

    code = train_main(argv)
    (out / f"threads_rank{os.environ['RANK']}.json").write_text(json.dumps(thread_names()))
    return code


if __name__ == "__main__":
    sys.exit(main())
