from tunnel_agent.cli import main

raise SystemExit(main())
