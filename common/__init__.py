"""What server and client both need: wire schemas, codec, noise, aggregation, settings."""
