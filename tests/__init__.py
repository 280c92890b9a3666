"""The tests: pytest over the agent, the key server, the boot integration, the benchmark
harness and real OpenZFS in QEMU (tests/vm). README's Development section lists the tiers."""
