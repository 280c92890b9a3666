"""The benchmark suite (`make bench`): the key server, a reboot storm and the agent's cold
unlock against nginx, tangd, clevis and curl on 127.0.0.1; the report is docs/benchmarks.md.
vm.py renders docs/benchmarks-vm.md, from the benchmark case the real-OpenZFS tier
(tests/vm) runs in its guest."""
