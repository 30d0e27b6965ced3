from vampd.cli import main

raise SystemExit(main())
