"""`python -m explainer.demo`: the `make demo` driver, which lives in explainer/experiments/demo.py (kept so that the
documented command keeps working)."""

import sys

from explainer.experiments.demo import main

if __name__ == "__main__":
    sys.exit(main())
