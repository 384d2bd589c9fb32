"""``python -m varstudy.bench``."""

from varstudy.bench import main

raise SystemExit(main())
