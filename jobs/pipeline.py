"""Ray job entrypoint for `voldit pipeline`; every argument is passed through.

ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/pipeline.py --help
"""

import sys

from voldit.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
