"""The Redis side: pub/sub sources, stream readers, discovery of Sentinel and Cluster nodes."""
