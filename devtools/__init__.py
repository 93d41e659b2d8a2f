"""Development tooling shared by the tests, the benchmarks and `make run`; never installed on hosts."""
