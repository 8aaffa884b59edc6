"""Ray job entrypoint for `voldit sweep`; every argument is passed through.

ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/sweep.py --help
"""

import sys

from voldit.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
