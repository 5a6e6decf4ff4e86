"""Train the paper's MNIST MLP: `python experiments/run.py --wd 0 --steps 1e7`
(the same as the `grokjax-train` command; `--help` explains every flag)."""

import sys

from grokjax.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
