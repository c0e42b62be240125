from cds.hooks.cli import main

raise SystemExit(main())
