"""`python -m workers`: one training worker process."""

import logging
import os
import sys

from app.db.session import dispose_engines
from workers.loop import main

# Guarded: the ranks of a distributed job start by `spawn`, which imports the parent's main module.
if __name__ == "__main__":
    code = main()
    # Everything the worker did is committed by now. The interpreter's own teardown (garbage-collecting
    # the module graph of torch, dynamo and triton) would take seconds more on a busy machine, seconds in
    # which a stopping container is still up: close the connections, flush the logs and leave at once.
    dispose_engines()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
