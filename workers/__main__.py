"""`python -m workers`: one training worker process."""

from workers.loop import main

raise SystemExit(main())
