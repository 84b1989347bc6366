"""Simulations and streaming-learning workloads run under reca."""
