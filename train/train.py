"""torchrun entry point: ``torchrun --nproc-per-node N train/train.py --config CONFIG [key.path=value ...]``.

The same as ``f2llm train``. See README.md for single-GPU, multi-GPU, multi-node and SLURM launches.
"""

import sys

from f2llm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
