"""Planning before paying for a device: memory per target and peak throughput."""
