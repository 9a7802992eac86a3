"""keystate benchmarks: each script takes --quick and --json (the contract in docs/architecture.md#benchmark-json)."""
