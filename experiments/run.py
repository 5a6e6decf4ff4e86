"""Train the paper's MNIST MLP: `python experiments/run.py --wd 0 --steps 1e7`.

Flags are the fields of `grokjax.config.TrainConfig` (see `--help`), plus `--seeds 0,1,2`
to train several seeds at once into `<out>/seed<k>`. Bad values exit with code 2 and a
one-line message; a diverged run exits with code 3 and keeps its checkpoints.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grokjax.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
