"""Ray job entrypoint for `voldit encode`; every argument is passed through.

ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/encode.py --help
"""

import sys

from voldit.cli import main

if __name__ == "__main__":
    sys.exit(main(["encode", *sys.argv[1:]]))
