"""Data-parallel replicas on Ray Serve (`tinyserve serve --data-parallel-size N`): service.py."""
