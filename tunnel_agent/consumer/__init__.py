"""The consumer's side: ``tunnel-agent connect``, a local port that leads to a relay session."""
