"""The torch-free half of the engine: requests, scheduling, KV block accounting, detokenization."""
