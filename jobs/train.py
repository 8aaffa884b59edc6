"""Ray job entrypoint for `voldit train`; every argument is passed through.

ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/train.py --help
"""

import sys

from voldit.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
