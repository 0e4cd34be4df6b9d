"""The released code that soco's defaults reproduce, rebuilt from installed packages, for tests and benchmarks."""
