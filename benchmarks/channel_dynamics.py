"""`python benchmarks/channel_dynamics.py`: the channel-dynamics diagnostic, which lives in
explainer/experiments/channel_dynamics.py (also `python -m explainer.experiments.channel_dynamics`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explainer.experiments.channel_dynamics import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
