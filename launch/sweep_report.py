"""Same as `explainer sweep-report`; the code lives in explainer/sweep_report.py, which pip installs."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's explainer first
from explainer.sweep_report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python launch/sweep_report.py"))
