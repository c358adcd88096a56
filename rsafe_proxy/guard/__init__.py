"""The guard: RSafe prompt rendering, verdict parsing, engines and the screener."""
