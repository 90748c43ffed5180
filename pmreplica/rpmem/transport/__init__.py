"""Data paths of remote pools: ``tcp`` everywhere, ``verbs`` (RDMA) where a device exists."""
