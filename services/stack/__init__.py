"""Running parts as real processes: `Part` (one process and its health check) and `Stack` (a serving stack
built from a `StackSpec`), used by `imsearch serve`, `imsearch cluster`, the integration tests and the
benchmarks; plus the self-signed TLS of one-machine clusters."""
