"""Configuration: the schema (settings), loading from TOML and environment (loading), proxies."""
