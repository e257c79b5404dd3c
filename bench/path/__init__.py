"""bench/bench_path.py's parts: the load and counting processes, the driver, and one module
per scenario (``s1_bare`` … ``s6_latency``), each with its measure and its summary rows."""
