"""The benchmark suite (`make bench`): the key server, a reboot storm and the agent's cold
unlock against nginx, tangd, clevis and curl on 127.0.0.1; the report is docs/benchmarks.md."""
