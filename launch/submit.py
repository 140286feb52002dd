"""Same as `explainer submit`; the code lives in explainer/submit.py, which pip installs."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's explainer first
from explainer.submit import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python launch/submit.py"))
