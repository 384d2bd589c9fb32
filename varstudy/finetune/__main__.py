"""``python -m varstudy.finetune``."""

from varstudy.finetune.command import main

raise SystemExit(main())
