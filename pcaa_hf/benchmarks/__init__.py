"""Speed and memory measurements for docs/benchmarks.md (`pcaa-benchmark`); the library never imports them."""
