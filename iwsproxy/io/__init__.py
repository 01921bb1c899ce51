"""The gevent I/O layer: sockets, greenlets and third-party errors live here and nowhere else."""
