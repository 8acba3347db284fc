"""`python -m workers`: one training worker process."""

from workers.loop import main

# Guarded: the ranks of a distributed job start by `spawn`, which imports the parent's main module.
if __name__ == "__main__":
    raise SystemExit(main())
