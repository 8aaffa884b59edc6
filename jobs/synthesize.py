"""Ray job entrypoint for `voldit synthesize`; every argument is passed through.

ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/synthesize.py --help
"""

import sys

from voldit.cli import main

if __name__ == "__main__":
    sys.exit(main(["synthesize", *sys.argv[1:]]))
