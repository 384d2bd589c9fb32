"""``python -m varstudy.study``."""

from varstudy.study.command import main

raise SystemExit(main())
