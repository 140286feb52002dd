"""`python -m explainer.bias`: the bias study, which lives in explainer/experiments/bias.py (kept so that the
documented command keeps working)."""

import sys

from explainer.experiments.bias import main

if __name__ == "__main__":
    sys.exit(main())
