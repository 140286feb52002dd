"""Same as `explainer make-shards`; the code lives in explainer/make_shards.py, which pip installs."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's explainer first
from explainer.make_shards import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python launch/make_shards.py"))
