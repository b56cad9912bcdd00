from tabgpt.cli import main

raise SystemExit(main())
