from llm_lru.cli import main

raise SystemExit(main())
