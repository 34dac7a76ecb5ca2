"""Tools around the server: the benchmark, its pyfuse3 floor, the soak test."""
