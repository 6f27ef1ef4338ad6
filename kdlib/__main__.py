from kdlib.cli import main

raise SystemExit(main())
