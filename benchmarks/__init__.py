"""keystate benchmarks: each script takes --quick and --json (DESIGN.md section 8)."""
