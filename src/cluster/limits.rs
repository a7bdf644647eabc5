//! Global rate limits and concurrency caps in Redis (filled in by the limits work).
